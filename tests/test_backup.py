"""Backup of an embedded memory while another thread writes to it, and restore verified by the ledger's count."""

from __future__ import annotations

import shutil
import threading
import warnings

import numpy as np
import pytest
from conftest import random_pairs

from reco_qdrant import Memory, MemoryDamagedError
from reco_qdrant.memory import point_id

BATCH, BATCHES = 100, 30


def test_backup_during_ingest_restores_an_acknowledged_state(tmp_path):
    img, txt, caps = random_pairs(BATCH * BATCHES, 32, seed=5)
    acked = [0]
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img[:BATCH], txt[:BATCH], caps[:BATCH], ids=range(BATCH), source="s")
        acked[0] = BATCH

        def write():
            for b in range(1, BATCHES):
                s = b * BATCH
                mem.add_embeddings(img[s : s + BATCH], txt[s : s + BATCH], caps[s : s + BATCH],
                                   ids=range(s, s + BATCH), source="s")
                acked[0] = s + BATCH

        writer = threading.Thread(target=write)
        writer.start()
        while acked[0] < 5 * BATCH and writer.is_alive():  # mid-ingest
            pass
        points = mem.backup(tmp_path / "backup")
        during = acked[0]
        writer.join()
        assert mem.count() == BATCH * BATCHES
    assert points % BATCH == 0 and BATCH <= points <= during  # one acknowledged state, whole batches
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no copy out of step, nothing postponed
        assert Memory.restore(tmp_path / "backup", tmp_path / "restored") == points
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
    with pytest.raises(MemoryDamagedError, match="holds 100 points, but the ledger acknowledged 300"):
        Memory.restore(tmp_path / "late", tmp_path / "r")
