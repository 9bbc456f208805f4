"""Damage found on opening, cheaply: the ledger's acknowledged count against the engine's, and a sample of vectors."""

from __future__ import annotations

import shutil

import pytest
from conftest import random_pairs
from typer.testing import CliRunner

from reco_qdrant import Memory, MemoryDamagedError
from reco_qdrant.cli import app

runner = CliRunner()


def _bad_restore(tmp_path):
    """A memory of 300 acknowledged points whose collection directory was then restored from a copy taken at 100."""
    img, txt, caps = random_pairs(300)
    path = tmp_path / "m"
    with Memory.open(str(path)) as mem:
        mem.add_embeddings(img[:100], txt[:100], caps[:100], ids=range(100))
    shutil.copytree(path / "reco_memory", tmp_path / "backup")
    with Memory.open(str(path)) as mem:
        mem.add_embeddings(img[100:], txt[100:], caps[100:], ids=range(100, 300))
        mem.delete([mem.retrieve(mem.search(img[:1], "image", k=1).ids[0])[0].id])  # deletes are counted too
        assert mem.count() == 299
    shutil.rmtree(path / "reco_memory")
    shutil.copytree(tmp_path / "backup", path / "reco_memory")
    return path


def test_a_memory_holding_fewer_points_than_acknowledged_is_refused_on_opening(tmp_path):
    path = _bad_restore(tmp_path)
    with pytest.raises(MemoryDamagedError) as e:
        Memory.open(str(path))
    msg = str(e.value)
    assert "holds 100 points" in msg and "acknowledged 299" in msg and "--accept-count" in msg and "restore" in msg
    r = runner.invoke(app, ["info", "--memory", str(path)])
    assert r.exit_code != 0 and "acknowledged 299" in " ".join(r.output.split())
    r = runner.invoke(app, ["doctor", "--memory", str(path)])
    assert r.exit_code == 1
    r = runner.invoke(app, ["doctor", "--memory", str(path), "--accept-count"])  # a deliberate change: adopted
    assert r.exit_code == 0, r.output
    assert "was 299, now 100" in " ".join(r.output.split()), r.output
    with Memory.open(str(path)) as mem:
        assert mem.count() == 100


def test_counts_follow_every_write_and_reopen_cleanly(tmp_path):
    img, txt, caps = random_pairs(200)
    for _ in range(2):
        with Memory.open(str(tmp_path / "m")) as mem:
            mem.add_embeddings(img, txt, caps, ids=range(200))  # the second time: all updates, count unchanged
            mem.delete([mem.search(img[:1], "image", k=1).ids[0, 0]])
            mem.add_embeddings(img[:1], txt[:1], caps[:1], ids=[0])
    with Memory.open(str(tmp_path / "m")) as mem:
        assert mem.count() == 200


def test_points_added_outside_are_refused_too(tmp_path):
    """More points than acknowledged (a collection from another copy): refused the same way, naming both counts."""
    img, txt, caps = random_pairs(100)
    with Memory.open(str(tmp_path / "a")) as a:
        a.add_embeddings(img[:50], txt[:50], caps[:50], ids=range(50))
    with Memory.open(str(tmp_path / "b")) as b:
        b.add_embeddings(img, txt, caps, ids=range(100))
    shutil.rmtree(tmp_path / "a" / "reco_memory")
    shutil.copytree(tmp_path / "b" / "reco_memory", tmp_path / "a" / "reco_memory")
    with pytest.raises(MemoryDamagedError, match="holds 100 points, but the ledger acknowledged 50"):
        Memory.open(str(tmp_path / "a"))


def _filled(path, n=300):
    img, txt, caps = random_pairs(n)
    with Memory.open(str(path)) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(n))
    return img, txt, caps


def test_a_memory_whose_collection_directory_is_gone_is_refused_not_recreated_empty(tmp_path):
    """The collection directory deleted (or left out of a copy) while the ledger acknowledged 300 points: opening
    must not re-create it empty (a later write would reset the acknowledged range and hide the loss for good)."""
    path = tmp_path / "m"
    img, txt, caps = _filled(path)
    shutil.rmtree(path / "reco_memory")
    for _ in range(2):  # refused every time: nothing was re-created by the first attempt
        with pytest.raises(MemoryDamagedError) as e:
            Memory.open(str(path))
        msg = str(e.value)
        assert "holds 0 points" in msg and "acknowledged 300" in msg and str(path / "reco_memory") in msg, msg
        assert "restore" in msg and "--accept-count" in msg and "accept_count=True" in msg, msg
        assert not (path / "reco_memory").exists()
    with pytest.raises(MemoryDamagedError, match="acknowledged 300"):  # the migration that creates it refuses too
        Memory.open(str(path), check_count=False)
    assert not (path / "reco_memory").exists()
    r = runner.invoke(app, ["info", "--memory", str(path)])
    assert r.exit_code != 0 and "acknowledged 300" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["doctor", "--memory", str(path)])
    assert r.exit_code == 1 and "acknowledged 300" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["doctor", "--memory", str(path), "--accept-count"])  # adopted deliberately
    assert r.exit_code == 0 and "was 300, now 0" in " ".join(r.output.split()), r.output
    with Memory.open(str(path)) as mem:
        assert mem.count() == 0
        mem.add_embeddings(img[:10], txt[:10], caps[:10], ids=range(10))
    with Memory.open(str(path)) as mem:
        assert mem.count() == 10


def test_doctor_repair_ledger_with_accept_count_adopts_a_gone_collection(tmp_path):
    """`reco doctor --repair-ledger --accept-count` on a memory whose collection is gone: the count is adopted
    (the user passed --accept-count) before the migrations re-create the collection, not refused asking for it."""
    path = tmp_path / "m"
    img, txt, caps = _filled(path, 50)
    shutil.rmtree(path / "reco_memory")
    r = runner.invoke(app, ["doctor", "--memory", str(path), "--repair-ledger", "--accept-count"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 0 and "was 50, now 0" in flat and "pass --accept-count" not in flat, flat
    assert "adopt the empty engine deliberately" not in flat, flat
    with Memory.open(str(path)) as mem:  # re-created, migrated, and verified
        assert mem.count() == 0 and mem.pending_migrations() == [] and mem.count_check == "exact"
        mem.add_embeddings(img[:10], txt[:10], caps[:10], ids=range(10))
    with Memory.open(str(path)) as mem:
        assert mem.count() == 10
    path2 = _bad_restore(tmp_path / "b")  # the collection there: the count is adopted after reading every point
    r = runner.invoke(app, ["doctor", "--memory", str(path2), "--repair-ledger", "--accept-count"])
    assert r.exit_code == 0 and "was 299, now 100" in " ".join(r.output.split()), r.output


def test_open_with_accept_count_adopts_the_empty_engine_and_says_so(tmp_path):
    path = tmp_path / "m"
    _filled(path, 50)
    shutil.rmtree(path / "reco_memory")
    with Memory.open(str(path), accept_count=True) as mem:
        assert mem.count() == 0 and mem.adopted_count == ("50", 0)


def test_doctor_does_not_adopt_a_count_when_points_are_damaged(tmp_path, monkeypatch):
    """--accept-count adopts the engine's count only after reading every point found them whole."""
    import reco_qdrant.doctor as doctor

    path = _bad_restore(tmp_path)
    real = doctor._point_problems
    monkeypatch.setattr(doctor, "_point_problems", lambda r, dim: real(r, dim) + (
        ["have image vectors that are not unit-norm (damaged storage)"] if r.payload.get("key") == "7" else []))
    found = doctor.check_memory(str(path), accept_count=True)
    said = [f"{f.level}: {f.what}" for f in found]
    assert any(s.startswith("problem: 1 points have image vectors that are not unit-norm") for s in said), said
    assert any(s.startswith("problem: count not adopted (the ledger acknowledged 299, the engine holds 100)")
               for s in said), said
    with pytest.raises(MemoryDamagedError, match="acknowledged 299"):  # still refused: nothing adopted
        Memory.open(str(path))
    found = doctor.check_memory(str(path), accept_count=True, deep=False)  # --quick reads no point: no adoption
    assert any(f.level == "problem" and "count not adopted" in f.what and "without --quick" in f.fix
               for f in found), found
    monkeypatch.undo()
    found = doctor.check_memory(str(path), accept_count=True)
    assert any(f.level == "ok" and "was 299, now 100" in f.what for f in found), found
    with Memory.open(str(path)) as mem:
        assert mem.count() == 100
