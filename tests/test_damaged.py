"""A memory damaged on disk: every kind of file it keeps, truncated or garbled. Opening gives one clear
error naming the path and what to do (never a panic, a hang or a silent empty memory), and `reco doctor`
finds what opening cannot see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import random_pairs
from typer.testing import CliRunner

from reco_qdrant import Memory, MemoryDamagedError
from reco_qdrant.cli import app
from reco_qdrant.doctor import check_memory

runner = CliRunner()
N = 400


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "mem"
    img, txt, caps = random_pairs(N, seed=7)
    with Memory.open(str(root)) as mem:
        mem.add_embeddings(img, txt, caps, ids=[str(i) for i in range(N)], source="s", encoder_id="enc")
    return root


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    dst = tmp_path / "mem"
    shutil.copytree(pristine, dst)
    return dst


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    assert found, f"the memory keeps no {pattern} (did the engine's layout change?)"
    return found[0]


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _garble(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(0, len(data), 7):
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))


def _other_version(p: Path) -> None:
    p.write_text("99.0.0")


DAMAGE = {  # case -> (file pattern under the memory directory, what is done to it)
    "segment config emptied": ("reco_memory/segments/*/segment.json", _empty),
    "segment config garbled": ("reco_memory/segments/*/segment.json", _garble),
    "vector status emptied (an engine panic)": ("reco_memory/segments/*/vector_storage-image/vectors/status.dat",
                                                _empty),
    "payload storage emptied": ("reco_memory/segments/*/payload_storage/page_0.dat", _empty),
    "id tracker garbled": ("reco_memory/segments/*/mutable_id_tracker.mappings", _garble),
    "WAL garbled": ("reco_memory/wal/open-1", _garble),
    "WAL emptied": ("reco_memory/wal/open-1", _empty),
    "shard config emptied": ("reco_memory/edge_config.json", _empty),
    "segment from another engine version": ("reco_memory/segments/*/version.info", _other_version),
    "ledger WAL garbled": ("reco_memory__meta/wal/open-1", _garble),
    "ledger segment garbled": ("reco_memory__meta/segments/*/segment.json", _garble),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_file_gives_one_clear_error(copy, case):
    pattern, damage = DAMAGE[case]
    target = _one(copy, pattern)
    damage(target)
    with pytest.raises(MemoryDamagedError) as e:
        Memory.open(str(copy)).close()
    msg = str(e.value)  # names the memory, and the file or segment where the engine says which
    assert str(copy) in msg and "reco doctor" in msg and "\n" not in msg
    r = runner.invoke(app, ["doctor", "--memory", str(copy)])
    assert r.exit_code == 1 and "problem" in r.output
    r = runner.invoke(app, ["info", "--memory", str(copy)])  # every command: one error line and a hint
    assert r.exit_code == 1 and "Traceback" not in r.output and "reco doctor" in r.output


def test_missing_ledger_is_an_error_and_can_be_rebuilt(copy):
    shutil.rmtree(copy / "reco_memory__meta")
    with pytest.raises(MemoryDamagedError, match="ledger .* is missing.*--repair-ledger"):
        Memory.open(str(copy))
    r = runner.invoke(app, ["doctor", "--memory", str(copy), "--repair-ledger", "--json"])
    assert r.exit_code == 0, r.output
    found = json.loads(r.stdout)
    assert any("ledger rebuilt" in f["what"] for f in found)
    assert any(f["level"] == "warning" and "not recorded" in f["what"] for f in found)
    with Memory.open(str(copy)) as mem:
        assert mem.count() == N and mem.search(random_pairs(1, seed=7)[0], "image", 1).ids[0, 0]


@pytest.mark.parametrize("damage", ["garbled", "deleted"])
def test_lock_file_damage_is_harmless(copy, damage):
    lock = copy / ".reco_memory.lock"
    lock.write_bytes(b"\xff\xfe not a pid") if damage == "garbled" else lock.unlink()
    with Memory.open(str(copy)) as mem:
        assert mem.count() == N


def test_garbled_vectors_are_found_on_opening_and_by_the_doctor(copy):
    _garble(_one(copy, "reco_memory/segments/*/vector_storage-image/vectors/chunk_0.mmap"))
    with pytest.raises(MemoryDamagedError, match="image vector has norm .* expected 1.*reco doctor"):
        Memory.open(str(copy))  # the engine stores no checksums: the sample checked on opening finds it
    found = check_memory(str(copy))
    bad = [f for f in found if f.level == "problem"]
    assert bad and "not unit-norm" in " ".join(f.what for f in bad) and "re-ingest" in bad[-1].fix
    assert runner.invoke(app, ["doctor", "--memory", str(copy)]).exit_code == 1


@pytest.mark.parametrize("damage", [_garble, _empty], ids=["garbled", "emptied"])
def test_a_damaged_vector_copy_costs_speed_not_answers_and_the_doctor_says_so(copy, damage):
    damage(copy / "reco_memory__vectors" / "text.f32")
    img, txt, _ = random_pairs(N, seed=7)
    with pytest.warns(UserWarning, match="out of step"), Memory.open(str(copy)) as mem:  # found on opening
        nb = mem.search(img[:20], "image", 1, "text")
    np.testing.assert_allclose(nb.vectors[:, 0], txt[:20], atol=1e-6)  # the engine's vectors, not the copy's
    found = check_memory(str(copy))
    warned = [f for f in found if f.level == "warning" and "vector copy" in f.what]
    assert warned and f"{N:,} points have no row or another point's vectors" in warned[0].what
    assert "reco copy" in warned[0].fix and not [f for f in found if f.level == "problem"]


def test_doctor_on_a_healthy_memory(copy):
    r = runner.invoke(app, ["doctor", "--memory", str(copy), "--json"])
    assert r.exit_code == 0, r.output
    found = json.loads(r.stdout)
    assert {f["level"] for f in found} == {"ok"} and any(f"{N} points read" in f["what"] for f in found)


def test_doctor_on_a_memory_in_use(copy):
    with Memory.open(str(copy)):
        r = runner.invoke(app, ["doctor", "--memory", str(copy)])
    assert r.exit_code == 1 and "in use" in r.output
    assert np.isfinite(N)
