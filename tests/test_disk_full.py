"""A disk that runs out of space during ingest: one clear error naming the memory and the space needed,
every point acknowledged before it still there, and the same ingest completing once there is room.

The filesystem is a small tmpfs the test mounts (it needs the right to mount: root in a container that
allows it; elsewhere the test is skipped, saying so). Ingests run in a child process: if a write ever
reached a full disk through the engine's memory maps, it would die of SIGBUS, and the test would say so
instead of taking pytest down with it."""

from __future__ import annotations

import json
import shutil
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


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_reading_a_memory_whose_index_is_due_needs_no_room_for_the_index(small_disk, tmp_path):
    """Opening and searching a memory whose index build is due, on a disk too full for the build: the build is
    postponed with one warning and searches are right; an explicit build is refused, a small write still runs."""
    from reco_qdrant.backends import DISK_RESERVE

    assert _mount(small_disk, 1024, remount=True)  # room for the memory, then filled below
    mem = small_disk / "mem"
    fill = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from conftest import random_pairs\nfrom reco_qdrant import Memory\n"
            "img, txt, caps = random_pairs(24_000, 64, seed=4)\n"
            f"with Memory.open({str(mem)!r}, auto_index=False) as m:\n"
            "    m.add_embeddings(img, txt, caps, encoder_id='enc')\n"
            f"with Memory.open({str(mem)!r}, auto_index=False) as m:\n"
            "    print(m.backend.stored_bytes(), *m.index_backlog())")
    r = _child(fill)
    assert r.returncode == 0, r.stderr[-2000:]
    stored, points, unindexed = map(int, r.stdout.split())
    assert points == 24_000 and unindexed == 48_000  # due: nothing indexed yet
    free = shutil.disk_usage(small_disk).free
    room = DISK_RESERVE + 96 * 2**20  # what opening takes (measured ~70 MiB: new appendable segments), not the build
    assert stored > 96 * 2**20, (stored, free)  # the build needs more than is left
    subprocess.run(["fallocate", "-l", str(free - room), str(small_disk / "filler")], check=True)
    probe = (f"import json, sys, warnings; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
             "import numpy as np\nfrom conftest import random_pairs\n"
             "import reco_qdrant.memory as M\nfrom reco_qdrant import Memory\n"
             "from reco_qdrant.memory import MemoryFullError\n"
             "IndexPostponedWarning = getattr(M, 'IndexPostponedWarning', UserWarning)\n"
             "img, txt, caps = random_pairs(24_000, 64, seed=4)\n"
             "out = {}\n"
             "with warnings.catch_warnings(record=True) as w:\n"
             "    warnings.simplefilter('always')\n"
             f"    with Memory.open({str(mem)!r}) as m:\n"
             "        a = m.search(img[:200], 'image', k=5)\n"
             "        b = m.search(img[:200], 'image', k=5)\n"
             "        e = m.search(img[:200], 'image', k=5, exact=True)\n"
             "        out['right'] = bool((a.ids == e.ids).all() and (b.ids == e.ids).all())\n"
             "        out['self'] = float((a.scores[:, 0] > 0.999).mean())\n"
             "        out['count'] = m.count()\n"
             "        out['unindexed'] = m.index_backlog()[1]\n"
             "        for name, fn in (('optimize', m.optimize), ('ensure', m.ensure_indexed),\n"
             "                         ('write', lambda: m.add_embeddings(img[:10], txt[:10], caps[:10], ids=list('abcdefghij'), encoder_id='enc'))):\n"  # noqa: E501
             "            try:\n"
             "                fn()\n"
             "                out[name] = 'ran'\n"
             "            except MemoryFullError as x:\n"
             "                out[name] = str(x)\n"
             "out['warnings'] = [str(x.message) for x in w if issubclass(x.category, IndexPostponedWarning)]\n"
             "print(json.dumps(out))")
    r = _child(probe)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -7 would be SIGBUS
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["count"] == 24_000 and out["right"] and out["self"] == 1.0
    assert out["unindexed"] == 48_000  # nothing was built
    assert len(out["warnings"]) == 1 and "index build postponed" in out["warnings"][0]  # once, not per search
    assert "building the index needs about" in out["optimize"] and "building the index" in out["ensure"]
    assert out["write"] == "ran"  # a write that fits is not refused for the index it cannot build


def _due_memory(tmp_path, monkeypatch, n=300):
    """A small memory whose index build is always due (as for a large one), on a disk whose free space the test
    sets (`free[0]`); the collection's stored bytes are a fixed 10 MiB."""
    from conftest import random_pairs

    import reco_qdrant.backends as B
    import reco_qdrant.indexing as M  # where `Memory.ensure_indexed` asks whether a build is due

    img, txt, caps = random_pairs(n, 32, seed=3)
    with Memory.open(str(tmp_path / "m"), auto_index=False) as m:
        m.add_embeddings(img, txt, caps, encoder_id="enc")
    monkeypatch.setattr(M, "index_due", lambda *a, **kw: True)
    free = [B.DISK_RESERVE + 2**20]  # room to open and write a little, not to build (10 MiB + the reserve)
    walks = []
    monkeypatch.setattr(B.EdgeBackend, "free_bytes", lambda self: free[0])
    monkeypatch.setattr(B.EdgeBackend, "stored_bytes", lambda self: walks.append(1) or 10 * 2**20)
    return img, txt, caps, free, walks


def test_a_postponed_index_build_is_retried_by_a_later_search(tmp_path, monkeypatch):
    """A build that did not fit (on opening or before a search) stays due: a later search tries it again once
    there is room, as the warning says, instead of never again until the next write."""
    import warnings

    import reco_qdrant.indexing as M  # where `Memory.ensure_indexed` asks whether a build is due

    img, txt, caps, free, _ = _due_memory(tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for when in ("opening", "search"):
            with Memory.open(str(tmp_path / "m")) as m:  # postponed on opening
                built = []
                monkeypatch.setattr(m.backend, "optimize", lambda built=built: built.append(1) or True)
                if when == "search":  # a write, then the build before the search is postponed
                    m.add_embeddings(img[:5], txt[:5], caps[:5], ids=list("abcde"), encoder_id="enc")
                    m.search(img[:2], "image", k=3)
                m.search(img[:2], "image", k=3)  # still no room: postponed again (warned once only)
                assert built == []
                free[0] = 2**40
                m.search(img[:2], "image", k=3)  # room now: built before this search
                assert built == [1], when
                m.search(img[:2], "image", k=3)
                assert built == [1], when  # and not again
            free[0] = M.DISK_RESERVE + 2**20
    assert sum(issubclass(x.category, M.IndexPostponedWarning) for x in w) == 2  # once per opened memory


def test_a_postponed_build_is_not_retried_by_every_search(tmp_path, monkeypatch, capsys):
    """After a postponement, searches neither print the "indexing" line nor walk the collection's files again
    while the disk stays short (a cheap free-space check says so, before the write lock); once the disk has
    room, the next search builds the index (and only then says it is indexing)."""
    import warnings

    img, txt, caps, free, walks = _due_memory(tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with Memory.open(str(tmp_path / "m")) as m:  # postponed on opening
            built = []
            monkeypatch.setattr(m.backend, "optimize", lambda: built.append(1) or True)
            walks.clear()
            capsys.readouterr()
            for _ in range(50):
                m.search(img[:2], "image", k=3)
            assert built == [] and len(walks) <= 1, (built, len(walks))
            assert "indexing" not in capsys.readouterr().err
            free[0] = 2**40
            m.search(img[:2], "image", k=3)
            assert built == [1]
            assert "indexing" in capsys.readouterr().err  # said when the build really starts


def test_an_index_build_the_engine_fails_does_not_refuse_reads(tmp_path, monkeypatch, capsys):
    """The engine failing a build our estimate allowed (its own "No space left on device" error, the disk filled
    meanwhile) postpones it with one warning naming the cause: every search answers, exactly, and the build is
    not re-run by each search; once clearly more room is free, a search builds it."""
    import warnings

    import reco_qdrant.indexing as M  # where `Memory.ensure_indexed` asks whether a build is due

    img, txt, caps, free, _ = _due_memory(tmp_path, monkeypatch)
    free[0] = 2**30  # our estimate (10 MiB + the reserve) fits
    calls = []

    def engine_optimize(real):
        calls.append(1)
        if free[0] < 2**31:
            raise RuntimeError("Service internal error: No space left on device (os error 28)")
        return real()

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Memory.open(str(tmp_path / "m"), auto_index=False) as m:
            real = m.backend.optimize
            monkeypatch.setattr(m.backend, "optimize", lambda: engine_optimize(real))
            m._auto_index = True
            m.add_embeddings(img[:5], txt[:5], caps[:5], ids=list("abcde"), encoder_id="enc")
            exact = m.search(img[:20], "image", k=5, exact=True)
            for _ in range(20):
                got = m.search(img[:20], "image", k=5)
                assert (got.ids == exact.ids).all()
            assert len(calls) == 1, len(calls)  # tried once, not by every search
            free[0] = 2**32
            m.search(img[:20], "image", k=5)
            assert len(calls) == 2 and m._postponed is None
    said = [str(x.message) for x in w if issubclass(x.category, M.IndexPostponedWarning)]
    assert len(said) == 1 and "No space left on device" in said[0], said


def test_counting_other_collections_on_a_nearly_full_disk_loads_nothing_and_says_so(tmp_path, monkeypatch):
    """Loading a collection writes (as opening does): below the reserve opening needs, collections beside the
    one asked about are not loaded to be counted, and the messages say they were not counted."""
    from collections import namedtuple

    from conftest import random_pairs
    from typer.testing import CliRunner

    import reco_qdrant.backends as B
    from reco_qdrant.cli import app
    from reco_qdrant.doctor import collections_said, fullest_collection

    img, txt, caps = random_pairs(30, 16, seed=1)
    for coll, n in (("big", 30), ("small", 10)):
        with Memory.open(str(tmp_path / "m"), collection=coll) as m:
            m.add_embeddings(img[:n], txt[:n], caps[:n], encoder_id="enc")
    assert B.count_edge_collection(tmp_path / "m", "big") == 30
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20)
                        if str(p).startswith(str(tmp_path / "m")) else real(p))
    loaded = []
    import qdrant_edge as qe

    real_load = qe.EdgeShard.load
    monkeypatch.setattr(qe.EdgeShard, "load", lambda *a, **kw: loaded.append(a) or real_load(*a, **kw))
    held = {n: B.count_edge_collection(tmp_path / "m", n) for n in ("big", "small")}
    assert loaded == []  # nothing loaded: nothing written on the full disk
    assert all(isinstance(c, B.UncountedCollection) for c in held.values()), held
    said = collections_said(held)
    assert "big (points not counted: 1 MiB free on the disk, loading it needs 256 MiB)" in said, said
    assert fullest_collection(held) == "big"  # neither counted: the first readable one is suggested
    assert fullest_collection({"a": B.UnreadableCollection("x"), "b": 3, "c": 7, "d": held["small"]}) == "c"
    r = CliRunner().invoke(app, ["info", "--memory", str(tmp_path / "m"), "--collection", "none"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 1 and "has no collection 'none'; it holds big (points not counted" in flat, flat
    assert "Traceback" not in r.output


def test_a_build_failing_for_another_reason_is_retried_after_a_write_and_damage_is_not_swallowed(tmp_path,
                                                                                              monkeypatch):
    """An engine failure that is not about space (e.g. too many open files) does not wait for free space that
    may never come: it is retried once something was written, not by every search. Our own errors (damage, a
    memory in use) are never turned into a postponement."""
    import warnings

    from reco_qdrant import MemoryDamagedError

    img, txt, caps, free, _ = _due_memory(tmp_path, monkeypatch)
    free[0] = 2**30  # our estimate fits
    calls, fail = [], [OSError(24, "Too many open files")]

    def optimize():
        calls.append(1)
        if fail:
            raise fail[0]
        return True

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with Memory.open(str(tmp_path / "m"), auto_index=False) as m:
            monkeypatch.setattr(m.backend, "optimize", optimize)
            m._auto_index = True
            m.add_embeddings(img[:5], txt[:5], caps[:5], ids=list("abcde"), encoder_id="enc")
            for _ in range(10):
                m.search(img[:2], "image", k=3)
            assert len(calls) == 1  # not by every search
            fail.clear()
            m.add_embeddings(img[5:8], txt[5:8], caps[5:8], ids=list("fgh"), encoder_id="enc")
            m.search(img[:2], "image", k=3)
            assert len(calls) == 2 and m._postponed is None  # retried after the write, and built
            fail.append(MemoryDamagedError("segment 3 is damaged"))
            m.add_embeddings(img[8:10], txt[8:10], caps[8:10], ids=list("ij"), encoder_id="enc")
            with pytest.raises(MemoryDamagedError, match="segment 3"):
                m.search(img[:2], "image", k=3)
