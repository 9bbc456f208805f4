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
