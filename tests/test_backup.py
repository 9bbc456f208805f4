"""Backup of an embedded memory while another thread writes to it, and restore verified by the ledger's count."""

from __future__ import annotations

import json
import shutil
import threading
import warnings

import numpy as np
import pytest
from conftest import random_pairs
from typer.testing import CliRunner

from reco_qdrant import Memory, MemoryDamagedError
from reco_qdrant.cli import app
from reco_qdrant.memory import Restored, point_id

BATCH, BATCHES = 100, 30
runner = CliRunner()


def test_backup_during_ingest_restores_an_acknowledged_state(tmp_path):
    """The writer acknowledges 6 batches, then waits until the backup has begun (it holds the write lock: the
    engine was flushed), and writes on meanwhile: its next batch waits for the copy. The backup is one state
    between acknowledged batches, not the empty memory nor the whole ingest (a lock is not fair: without the
    events the backup could run before the writer's first batch or after its last)."""
    img, txt, caps = random_pairs(BATCH * BATCHES, 32, seed=5)
    acked = [0]  # every count the writer saw acknowledged, in order
    mid, started = threading.Event(), threading.Event()
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img[:BATCH], txt[:BATCH], caps[:BATCH], ids=range(BATCH), source="s")
        acked.append(BATCH)
        real_flush = mem.backend.flush
        mem.backend.flush = lambda: (started.set(), real_flush())[1]  # called by backup under the write lock

        def write():
            for b in range(1, BATCHES):
                s = b * BATCH
                mem.add_embeddings(img[s : s + BATCH], txt[s : s + BATCH], caps[s : s + BATCH],
                                   ids=range(s, s + BATCH), source="s")
                acked.append(s + BATCH)
                if b == 5:
                    mid.set()
                    assert started.wait(60)  # the backup has begun: write on while it copies

        writer = threading.Thread(target=write)
        writer.start()
        assert mid.wait(60)
        before = acked[-1]
        points = mem.backup(tmp_path / "backup")
        writer.join()
        assert mem.count() == BATCH * BATCHES and acked[-1] == BATCH * BATCHES
    assert before == 6 * BATCH and points == before  # the state acknowledged when the backup began
    assert 0 < points < BATCH * BATCHES and points in acked
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no copy out of step, nothing postponed
        assert Memory.restore(tmp_path / "backup", tmp_path / "restored") == Restored(points, True)
        with Memory.open(str(tmp_path / "restored")) as r:
            got = {rec.id: rec for recs in r.scroll(500) for rec in recs}
            assert set(got) == {point_id("s", str(i)) for i in range(points)}  # exactly the first `points` pairs
            for i in range(0, points, 37):
                np.testing.assert_allclose(got[point_id("s", str(i))].vectors["image"], img[i], atol=1e-6)
            nb = r.search(img[:points:50], "image", k=1, return_modality="text")
            np.testing.assert_allclose(nb.vectors[:, 0], txt[:points:50], atol=1e-5)
    with pytest.raises(FileExistsError, match="already holds"):
        Memory.restore(tmp_path / "backup", tmp_path / "restored")


def test_a_truncated_backup_is_refused_on_restore(tmp_path):
    img, txt, caps = random_pairs(300)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img[:100], txt[:100], caps[:100], ids=range(100))
        mem.backup(tmp_path / "early")
        mem.add_embeddings(img[100:], txt[100:], caps[100:], ids=range(100, 300))
        mem.backup(tmp_path / "late")
    shutil.rmtree(tmp_path / "late" / "reco_memory")  # the collection of an earlier backup beside a later ledger
    shutil.copytree(tmp_path / "early" / "reco_memory", tmp_path / "late" / "reco_memory")
    with pytest.raises(MemoryDamagedError) as e:
        Memory.restore(tmp_path / "late", tmp_path / "r")
    msg = str(e.value)
    assert f"backup {tmp_path / 'late'}: its collection holds 100 points, but its ledger acknowledged 300" in msg, msg
    assert ".restore." not in msg and ".tmp" not in msg, msg  # never the staging directory it removed
    assert f"nothing was restored into {tmp_path / 'r'}" in msg, msg
    # the fix it names works: adopt the count on a copy of the backup, and restore that copy
    assert "reco doctor --memory COPY_OF_BACKUP --accept-count" in msg, msg
    shutil.copytree(tmp_path / "late", tmp_path / "copy")
    r = runner.invoke(app, ["doctor", "--memory", str(tmp_path / "copy"), "--accept-count"])
    assert r.exit_code == 0, r.output
    assert Memory.restore(tmp_path / "copy", tmp_path / "r") == Restored(100, True)


# --------------------------------------------------------------------------- the CLI


def _flat(r) -> str:
    return " ".join(r.output.split())


def _filled(path, n=240):
    img, txt, caps = random_pairs(n, seed=9)
    with Memory.open(str(path)) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(n), source="cli")
    return img


def test_cli_backup_and_restore_verify_the_count(tmp_path):
    img = _filled(tmp_path / "m")
    r = runner.invoke(app, ["backup", str(tmp_path / "bk"), "--memory", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    out = _flat(r)
    assert f"into {tmp_path / 'bk'}: 240 points" in out and "reco_memory/ (" in out and "reco_memory__meta/ (" in out
    r = runner.invoke(app, ["restore", str(tmp_path / "bk"), "--memory", str(tmp_path / "new"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["points"] == 240 and res["verified"] and "reco_memory" in res["copied"]
    with Memory.open(str(tmp_path / "new")) as mem:
        assert mem.count() == 240
        assert mem.search(img[:3], "image", k=1).ids[:, 0].tolist() == [point_id("cli", str(i)) for i in range(3)]
    r = runner.invoke(app, ["restore", str(tmp_path / "bk"), "--memory", str(tmp_path / "again")])
    assert r.exit_code == 0 and "verified: 240 points" in _flat(r), r.output


def test_cli_backup_refuses_an_existing_destination_naming_it(tmp_path):
    _filled(tmp_path / "m", 50)
    (tmp_path / "bk").mkdir()
    (tmp_path / "bk" / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["backup", str(tmp_path / "bk"), "--memory", str(tmp_path / "m")])
    assert r.exit_code == 1
    assert f"error: backup destination {tmp_path / 'bk'}: already exists" in _flat(r), r.output
    assert "hint: name a new directory" in _flat(r) and "Traceback" not in r.output
    assert (tmp_path / "bk" / "keep.txt").read_text() == "mine" and len(list((tmp_path / "bk").iterdir())) == 1
    r = runner.invoke(app, ["backup", str(tmp_path / "b2"), "--memory", str(tmp_path / "none")])  # nothing to copy
    assert r.exit_code == 1 and f"memory {tmp_path / 'none'}: no such directory" in _flat(r), r.output
    assert not (tmp_path / "none").exists() and not (tmp_path / "b2").exists()


def test_cli_restore_refuses_an_existing_collection_naming_it(tmp_path):
    _filled(tmp_path / "m", 60)
    _filled(tmp_path / "other", 30)
    assert runner.invoke(app, ["backup", str(tmp_path / "bk"), "--memory", str(tmp_path / "m")]).exit_code == 0
    r = runner.invoke(app, ["restore", str(tmp_path / "bk"), "--memory", str(tmp_path / "other")])
    assert r.exit_code == 1
    out = _flat(r)
    assert f"error: {tmp_path / 'other'}: already holds collection 'reco_memory'" in out, r.output
    assert "hint: restore into another directory" in out and "Traceback" not in r.output
    with Memory.open(str(tmp_path / "other")) as mem:
        assert mem.count() == 30  # untouched
    r = runner.invoke(app, ["restore", str(tmp_path / "missing"), "--memory", str(tmp_path / "r")])
    assert r.exit_code == 1 and f"error: backup {tmp_path / 'missing'}: no such directory" in _flat(r), r.output
    r = runner.invoke(app, ["restore", str(tmp_path / "bk"), "--memory", str(tmp_path / "r"), "--collection", "x"])
    assert r.exit_code == 1 and f"{tmp_path / 'bk'}: not a backup of collection 'x'" in _flat(r), r.output


def test_cli_backup_of_an_in_process_memory_is_a_clear_error(tmp_path):
    """qdrant-client's local mode has no snapshots: one error line, no traceback, nothing written."""
    for args in (["backup", str(tmp_path / "bk"), "--memory", ":memory:"],
                 ["restore", "http://host:6333/collections/c/snapshots/s.snapshot", "--memory", ":memory:"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, r.output
        assert "error: memory :memory:" in _flat(r) and "local mode has no snapshots" in _flat(r), r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "bk").exists()
    with Memory.open(":memory:") as mem:
        with pytest.raises(ValueError, match="local mode has no snapshots"):
            mem.backup(tmp_path / "bk2")


# --------------------------------------------------------------------------- restore: verified, complete, atomic


def test_restore_refuses_a_backup_without_its_collection_whose_ledger_acknowledges_points(tmp_path):
    img, txt, caps = random_pairs(80)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(80))
        mem.backup(tmp_path / "bk")
    shutil.rmtree(tmp_path / "bk" / "reco_memory")  # an incomplete backup: the ledger says 80 points
    with pytest.raises(MemoryDamagedError) as e:
        Memory.restore(tmp_path / "bk", tmp_path / "r")
    msg = str(e.value)
    assert f"backup {tmp_path / 'bk'}: no reco_memory/ directory" in msg and "acknowledged 80" in msg, msg
    assert ".restore." not in msg and ".tmp" not in msg, msg  # never the staging directory it removed
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())  # nothing restored, no staging


def _copied_while_open(tmp_path, n=60):
    """A memory directory copied with cp while it was open after a write (its ledger holds a range, 0..n)."""
    img, txt, caps = random_pairs(n)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(n))
        mem.flush()
        (tmp_path / "cp").mkdir()
        for part in ("reco_memory", "reco_memory__meta", "reco_memory__vectors"):
            shutil.copytree(tmp_path / "m" / part, tmp_path / "cp" / part)


def test_restore_says_not_verified_when_the_backup_records_no_exact_count(tmp_path):
    from reco_qdrant.memory import WRITE_VERSION_KEY

    _copied_while_open(tmp_path)
    done = Memory.restore(tmp_path / "cp", tmp_path / "r1")
    assert done.points == 60 and not done.verified and "range" in done.why, done
    r = runner.invoke(app, ["restore", str(tmp_path / "cp"), "--memory", str(tmp_path / "r2")])
    flat = _flat(r)
    assert r.exit_code == 0 and "60 points, not verified (the backup records no exact count)" in flat, flat
    assert "verified: 60" not in flat
    r = runner.invoke(app, ["restore", str(tmp_path / "cp"), "--memory", str(tmp_path / "r3"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["verified"] is False, r.output
    with Memory.open(str(tmp_path / "cp"), check_count=False) as mem:  # a ledger of an older version: no count
        v = mem.backend.meta_get(WRITE_VERSION_KEY)
        mem.backend.meta_set(WRITE_VERSION_KEY, {"n": v["n"], "token": v["token"]})
    done = Memory.restore(tmp_path / "cp", tmp_path / "r4")
    assert done.points == 60 and not done.verified and "records no count" in done.why, done


def test_restore_refuses_a_leftover_part_before_writing_anything(tmp_path):
    _filled(tmp_path / "m", 40)
    assert runner.invoke(app, ["backup", str(tmp_path / "bk"), "--memory", str(tmp_path / "m")]).exit_code == 0
    (tmp_path / "r" / "reco_memory__vectors").mkdir(parents=True)  # left over from an earlier memory
    with pytest.raises(FileExistsError, match=r"already holds collection 'reco_memory' \(reco_memory__vectors\)"):
        Memory.restore(tmp_path / "bk", tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["reco_memory__vectors"]


def test_restore_that_fails_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    import reco_qdrant.backup as M  # the module that copies and renames

    _filled(tmp_path / "m", 40)
    assert runner.invoke(app, ["backup", str(tmp_path / "bk"), "--memory", str(tmp_path / "m")]).exit_code == 0
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine.txt").write_text("keep")
    real, moved = M.os.rename, []

    def rename(src, dst, *a, **kw):  # the second part cannot be moved into place
        if moved:
            raise OSError(errno.EIO, "Input/output error")
        moved.append(dst)
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(M.os, "rename", rename)
    with pytest.raises(OSError) as e:
        Memory.restore(tmp_path / "bk", tmp_path / "r")
    monkeypatch.undo()
    msg = str(e.value)
    assert f"restore into {tmp_path / 'r'}: could not move reco_memory__meta into place" in msg, msg
    assert "nothing of the backup was left there" in msg
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["mine.txt"]  # the published part was removed
    assert Memory.restore(tmp_path / "bk", tmp_path / "r") == Restored(40, True)  # and the restore can run again


# --------------------------------------------------------------------------- backup: room checked, nothing partial


def test_backup_checks_room_on_dest_before_copying(tmp_path, monkeypatch):
    from collections import namedtuple

    import reco_qdrant.backup as M  # the module that copies and renames
    from reco_qdrant import MemoryFullError
    from reco_qdrant.backends import DISK_RESERVE

    _filled(tmp_path / "m", 60)
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    with Memory.open(str(tmp_path / "m")) as mem:
        monkeypatch.setattr(M.shutil, "disk_usage", lambda p: usage(2**40, 0, DISK_RESERVE)
                            if str(p) == str(tmp_path / "out") else real(p))
        (tmp_path / "out").mkdir()
        with pytest.raises(MemoryFullError) as e:
            mem.backup(tmp_path / "out" / "bk")
        msg = str(e.value)
        assert f"backup {tmp_path / 'out' / 'bk'}: 256.0 MiB free on its disk, the copy needs about" in msg, msg
        assert "plus the 256 MiB the memory's engine keeps free" in msg and "nothing was copied" in msg, msg
        assert list((tmp_path / "out").iterdir()) == []  # no DEST, no partial copy beside it
        monkeypatch.undo()
        assert mem.backup(tmp_path / "out" / "bk") == 60


def test_a_backup_keeps_the_engines_sparse_files_sparse(tmp_path):
    """The engine preallocates sparse files (32 MiB write-ahead-log segments): a backup and a restore copy what
    they hold, not their size (a 40-point memory's backup took 300 MB), and keep their length."""
    def usage(top):
        files = [f for f in top.rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files), sum(f.stat().st_blocks * 512 for f in files)

    img = _filled(tmp_path / "m", 40)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.backup(tmp_path / "bk")
    size, used = usage(tmp_path / "bk")
    src_size, src_used = usage(tmp_path / "m")
    if src_used > src_size // 4:
        pytest.skip("this filesystem keeps no sparse files: nothing to keep")
    assert size > 32 * 2**20 and used < size // 20, (size, used)  # lengths kept, holes not written
    assert used <= src_used + 2**20, (used, src_used)
    assert Memory.restore(tmp_path / "bk", tmp_path / "r") == Restored(40, True)
    size, used = usage(tmp_path / "r")
    assert used < size // 20, (size, used)
    with Memory.open(str(tmp_path / "r")) as r:
        assert r.search(img[:1], "image", k=1).ids[0, 0] == point_id("cli", "0")


def test_sparse_copy_keeps_data_holes_and_length(tmp_path):
    from reco_qdrant.backup import _sparse_copy

    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(8 * 2**20)
        f.write(b"middle" * 1000)
        f.truncate(32 * 2**20)
    _sparse_copy(str(src), str(tmp_path / "dst"))
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert (tmp_path / "dst").stat().st_blocks * 512 <= max(src.stat().st_blocks * 512, 2**20)


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_restore_checks_room_before_copying_and_names_stale_stages(tmp_path, monkeypatch):
    """Restore refuses (before copying) a backup that would not fit beside the engine's reserve on the target's
    disk; staging directories of a restore or backup that was killed (their process gone) are named in a warning
    and left alone (a process in another pid namespace may only look gone), those of a live process not named;
    names are matched exactly (a DEST named `bk[1]` is not a pattern)."""
    import os
    from collections import namedtuple

    import reco_qdrant.backup as M  # the module that copies and renames
    from reco_qdrant import MemoryFullError
    from reco_qdrant.backends import DISK_RESERVE

    _filled(tmp_path / "m", 60)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.backup(tmp_path / "bk")
    (tmp_path / "r").mkdir()
    dead, live = _dead_pid(), os.getppid()
    stages = [tmp_path / "r" / f".reco_memory.restore.{dead}-0123abcd.tmp",
              tmp_path / "r" / f".reco_memory.restore.{live}-0123abcd.tmp",
              tmp_path / f".bk2.{dead}.tmp", tmp_path / f".bk2.{live}.tmp", tmp_path / f".bk1.{dead}.tmp"]
    for st in stages:
        (st / "reco_memory").mkdir(parents=True)
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    monkeypatch.setattr(M.shutil, "disk_usage", lambda p: usage(2**40, 0, DISK_RESERVE + 1024)
                        if str(p) == str(tmp_path / "r") else real(p))
    with pytest.warns(UserWarning, match="interrupted") as w, pytest.raises(MemoryFullError) as e:
        Memory.restore(tmp_path / "bk", tmp_path / "r")
    msg = str(e.value)
    assert f"restore of backup {tmp_path / 'bk'} into {tmp_path / 'r'}: 256.0 MiB free on its disk" in msg, msg
    assert "plus the 256 MiB" in msg and "nothing was copied" in msg and "another disk" in msg, msg
    said = " ".join(str(x.message) for x in w)
    assert str(stages[0]) in said and str(stages[1]) not in said, said
    monkeypatch.undo()
    assert Memory.restore(tmp_path / "bk", tmp_path / "r") == Restored(60, True)
    with Memory.open(str(tmp_path / "m")) as mem:
        with pytest.warns(UserWarning, match="interrupted") as w:
            mem.backup(tmp_path / "bk2")
        said = " ".join(str(x.message) for x in w)
        assert str(stages[2]) in said and str(stages[3]) not in said and str(stages[4]) not in said, said
        import warnings as _w
        with _w.catch_warnings():
            _w.simplefilter("error")  # `bk[1]` matches `.bk1.*` as a glob; as a name it matches nothing
            mem.backup(tmp_path / "bk[1]")
    assert all(st.exists() for st in stages)  # named, never removed


def test_a_backup_that_fails_midway_leaves_no_partial_copy(tmp_path, monkeypatch):
    import errno

    import reco_qdrant.backup as M  # the module that copies and renames

    img = _filled(tmp_path / "m", 60)
    real, calls = shutil.copytree, []

    def copytree(src, dst, *a, **kw):  # the disk fills while the second part is copied
        calls.append(src)
        if len(calls) == 2:
            real(src, dst, *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **kw)

    with Memory.open(str(tmp_path / "m")) as mem:
        monkeypatch.setattr(M.shutil, "copytree", copytree)
        with pytest.raises(OSError, match="No space"):
            mem.backup(tmp_path / "bk")
        monkeypatch.undo()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the temporary copy was removed
        assert mem.search(img[:1], "image", k=1).ids[0, 0] == point_id("cli", "0")  # the memory goes on
    r = runner.invoke(app, ["backup", str(tmp_path / "bk"), "--memory", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
