"""A disk that runs out of space during ingest: one clear error naming the memory and the space needed,
every point acknowledged before it still there, and the same ingest completing once there is room.

The filesystem is a small tmpfs the test mounts (it needs the right to mount: root in a container that
allows it; elsewhere the test is skipped, saying so). Ingests run in a child process: if a write ever
reached a full disk through the engine's memory maps, it would die of SIGBUS, and the test would say so
instead of taking pytest down with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_ingest import make_shards

from reco_qdrant import Memory
from reco_qdrant.memory import point_id


def _mount(path: Path, size_mib: int, remount: bool = False) -> bool:
    opts = f"{'remount,' if remount else ''}size={size_mib}m"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount(disk, 440):
        pytest.skip("cannot mount a small tmpfs here (needs root in a container that allows mounts)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _ingest(src: Path, mem: Path, source: str) -> subprocess.CompletedProcess:
    code = "import sys; from reco_qdrant.cli import main; sys.argv[0] = 'reco'; main()"
    return subprocess.run([sys.executable, "-c", code, "ingest", "embeddings", str(src), "--memory", str(mem),
                           "--source", source, "--encoder-id", "enc", "--no-progress", "--json"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_disk_full_during_ingest(small_disk, tmp_path):
    mem = small_disk / "mem"
    make_shards(tmp_path / "small", n=3000, d=128, shard_size=3000, seed=1)
    make_shards(tmp_path / "big", n=40_000, d=128, shard_size=10_000, seed=2)  # ~120 MiB with its log

    first = _ingest(tmp_path / "small", mem, "small")
    assert first.returncode == 0, first.stderr
    big = _ingest(tmp_path / "big", mem, "big")
    assert big.returncode == 1, f"expected a clean refusal, got rc={big.returncode} (-7 = SIGBUS)\n{big.stderr}"
    err = " ".join(big.stderr.split())
    assert str(mem) in err and "MiB free" in err and "needs about" in err and "Traceback" not in err, err

    with Memory.open(str(mem), auto_index=False) as m:  # everything acknowledged is there
        assert m.count("small") == 3000
        stored_big = m.count("big")
        assert 0 < stored_big < 40_000  # some batches were acknowledged before the disk filled
        assert len(m.existing_ids([point_id("small", f"0:{i}") for i in (0, 1500, 2999)])) == 3
        assert m.count() == 3000 + stored_big

    assert _mount(small_disk, 1024, remount=True)  # space freed
    again = _ingest(tmp_path / "big", mem, "big")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["count"] == 43_000 and report["added"] == 40_000 - stored_big


def test_opening_on_a_nearly_full_disk_is_refused_not_killed(small_disk, tmp_path):
    make_shards(tmp_path / "small", n=3000, d=128, shard_size=3000, seed=1)
    mem = small_disk / "mem"
    assert _ingest(tmp_path / "small", mem, "small").returncode == 0
    subprocess.run(["fallocate", "-l", "340M", str(small_disk / "filler")], check=True)
    probe = (f"from reco_qdrant import Memory\nwith Memory.open({str(mem)!r}) as m: print(m.count())")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "MemoryFullError" in r.stderr and "opening it needs" in r.stderr, (r.returncode,
                                                                                                  r.stderr[-500:])
    (small_disk / "filler").unlink()
    with Memory.open(str(mem)) as m:
        assert m.count() == 3000
