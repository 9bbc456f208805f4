"""SIGKILL during an index build (100k pairs), `reco copy` and `reco dedup`, at random points.

After the kills: every acknowledged point is there bit for bit, exact search answers as on a clean
memory, the index is built again when needed, and re-running the interrupted job finishes it.
(Killed ingests are in test_ingest.py.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_ingest import snapshot

from reco_qdrant import Memory
from reco_qdrant.memory import EXACT_SEARCH_BELOW
from reco_qdrant.sources import write_embedding_shards

N, D = 100_000, 48
_OPTIMIZE = """
import sys
from reco_qdrant import Memory
mem = Memory.open(sys.argv[1], auto_index=False)
print("open", flush=True)
mem.optimize()
mem.close()
print("done", flush=True)
"""


def _pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n // 50, D)).astype(np.float32)
    img = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, D)).astype(np.float32)
    txt = img + 0.5 * rng.standard_normal((n, D)).astype(np.float32)
    return img, txt


def _build(root: Path, n: int) -> tuple:
    """A memory of n pairs, written but not indexed, with its snapshot and exact answers to 50 queries."""
    img, txt = _pairs(n, 0)
    with Memory.open(str(root / "source"), auto_index=False) as mem:
        for s in range(0, n, 10_000):
            e = min(n, s + 10_000)
            mem.add_embeddings(img[s:e], txt[s:e], [f"pair {i}" for i in range(s, e)], ids=range(s, e),
                               source="kills", encoder_id="enc")
        assert mem.index_backlog()[1] == 2 * n
        want = snapshot(mem)
        queries = _pairs(50, 1)[0]
        exact = mem.search(queries, "image", 10, "text", exact=True)
    return root, want, queries, exact


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """100k pairs: an index build long enough to be killed mid-way."""
    root = tmp_path_factory.mktemp("kills")
    yield _build(root, N)
    shutil.rmtree(root, ignore_errors=True)  # 0.7 GB: module data outlives pytest's per-test retention


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Below the size that needs an index, so copy and dedup runs are all copying and deleting."""
    root = tmp_path_factory.mktemp("kills-small")
    yield _build(root, EXACT_SEARCH_BELOW)
    shutil.rmtree(root, ignore_errors=True)


def _copy(root: Path, name: str) -> Path:
    dst = root / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root / "source", dst)
    return dst


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _kill_after(p: subprocess.Popen, seconds: float) -> int:
    time.sleep(seconds)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return p.returncode


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from reco_qdrant.cli import main; sys.argv[0] = 'reco'; main()",
            *args]


def _same_answers(mem: Memory, queries: np.ndarray, exact) -> None:
    got = mem.search(queries, "image", 10, "text", exact=True)
    assert (got.ids == exact.ids).all()
    np.testing.assert_array_equal(got.vectors, exact.vectors)


@pytest.mark.slow
def test_killed_index_build(built):
    root, want, queries, exact = built
    rng = random.Random(1)
    mem_dir = _copy(root, "killed")
    codes = []
    for _ in range(3):  # the build of 100k pairs takes ~25 s here; the kills land in its first few seconds
        p = _start([sys.executable, "-c", _OPTIMIZE, str(mem_dir)])
        assert p.stdout.readline().strip() == "open"
        codes.append(_kill_after(p, rng.uniform(0.5, 4.0)))
    assert codes.count(-signal.SIGKILL) == 3, f"a build finished before its kill: {codes}"
    with Memory.open(str(mem_dir), auto_index=False) as mem:
        assert mem.count() == N
        assert snapshot(mem) == want  # every point, bit for bit
        _same_answers(mem, queries, exact)
    with Memory.open(str(mem_dir)) as mem:  # the default open builds what the kills left unbuilt
        points, unindexed = mem.index_backlog()
        assert points == N and unindexed <= EXACT_SEARCH_BELOW
        nb = mem.search(queries, "image", 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nb.ids, exact.ids)])
        assert recall >= 0.9
        _same_answers(mem, queries, exact)
    p = _start([sys.executable, "-c", _OPTIMIZE, str(mem_dir)])  # and a re-run of the job finishes
    assert p.wait(timeout=900) == 0


@pytest.mark.slow
def test_killed_copy(small):
    root, want, queries, exact = small
    rng = random.Random(2)
    src, dst = _copy(root, "copy-src"), root / "copy-dst"
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    assert subprocess.run(_cli("copy", str(src), str(root / "copy-clean")), capture_output=True).returncode == 0
    t_copy = time.perf_counter() - t0
    codes = [_kill_after(_start(_cli("copy", str(src), str(dst))), rng.uniform(0.3, 0.9) * t_copy) for _ in range(3)]
    assert -signal.SIGKILL in codes, codes
    r = subprocess.run(_cli("copy", str(src), str(dst)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Memory.open(str(dst), auto_index=False) as mem:
        assert mem.count() == len(want) and snapshot(mem) == want
        _same_answers(mem, queries, exact)


@pytest.mark.slow
def test_killed_dedup(small, tmp_path):
    root, want, queries, exact = small
    rng = random.Random(3)
    img = np.stack([np.frombuffer(want[pid][0], np.float32) for pid in sorted(want)[:3000]])
    write_embedding_shards(tmp_path / "eval", img + 1e-4, img + 1e-4, [f"eval {i}" for i in range(len(img))])
    clean = _copy(root, "dedup-clean")
    t0 = time.perf_counter()
    r = subprocess.run(_cli("dedup", str(tmp_path / "eval"), "--memory", str(clean), "--json"), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    t_dedup = time.perf_counter() - t0
    mem_dir = _copy(root, "dedup-killed")
    codes = [_kill_after(_start(_cli("dedup", str(tmp_path / "eval"), "--memory", str(mem_dir))),
                         rng.uniform(0.3, 0.95) * t_dedup) for _ in range(3)]
    assert -signal.SIGKILL in codes, codes
    r = subprocess.run(_cli("dedup", str(tmp_path / "eval"), "--memory", str(mem_dir), "--json"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Memory.open(str(clean), auto_index=False) as a, Memory.open(str(mem_dir), auto_index=False) as b:
        assert a.count() <= len(want) - 3000 and snapshot(b) == snapshot(a)
