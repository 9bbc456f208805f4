"""Threads sharing one embedded memory: concurrent writers and readers lose, duplicate and mix up nothing."""

from __future__ import annotations

import threading
import warnings

import numpy as np
from conftest import random_pairs

from reco_qdrant.doctor import check_memory
from reco_qdrant.memory import Memory, point_id

WRITERS, READERS, BATCHES, BATCH = 4, 4, 12, 50


def test_four_writers_and_four_readers_on_one_memory(tmp_path):
    """From an empty directory (the first writes race on creating the collection): every acknowledged pair is
    there exactly once with its own vectors, the vector copy stays trusted, and `reco doctor` finds it clean."""
    n = WRITERS * BATCHES * BATCH
    img, txt, caps = random_pairs(n, 32, seed=3)
    acked: list[list[str]] = [[] for _ in range(WRITERS)]
    errors: list[BaseException] = []
    done = threading.Event()
    searched = [0] * READERS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mem = Memory.open(str(tmp_path / "m"))
        try:
            def write(w: int) -> None:
                try:
                    for b in range(BATCHES):
                        s = (w * BATCHES + b) * BATCH
                        keys = [f"w{w}-{i}" for i in range(s, s + BATCH)]
                        mem.add_embeddings(img[s : s + BATCH], txt[s : s + BATCH], caps[s : s + BATCH], ids=keys,
                                           source="threads", encoder_id="enc")
                        acked[w] += keys
                except BaseException as e:  # noqa: BLE001 - reported by the main thread
                    errors.append(e)

            def read(r: int) -> None:
                rng = np.random.default_rng(r)
                try:
                    while not done.is_set():
                        if not mem.backend.has_collection() or mem.count() < 10:
                            continue
                        q = img[rng.integers(0, n, 8)]
                        nb = mem.search(q, "image", k=5, return_modality="text", with_searched_vectors=True)
                        assert nb.vectors.shape == (8, 5, 32)
                        searched[r] += 1
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

            readers = [threading.Thread(target=read, args=(r,)) for r in range(READERS)]
            writers = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
            for t in readers + writers:
                t.start()
            for t in writers:
                t.join()
            done.set()
            for t in readers:
                t.join()
            assert not errors, errors[:3]
            assert sum(len(a) for a in acked) == n and min(searched) > 0
            assert mem.count() == n
            want = {point_id("threads", f"w{w}-{i}"): i for w in range(WRITERS)
                    for i in range(w * BATCHES * BATCH, (w + 1) * BATCHES * BATCH)}
            got = [r for recs in mem.scroll(500) for r in recs]
            assert len(got) == n and {r.id for r in got} == set(want)  # each once, none missing
            rows = set()
            for r in got:
                np.testing.assert_allclose(r.vectors["image"], img[want[r.id]], atol=1e-6)
                rows.add(r.copy_entry[0])
            assert len(rows) == n  # every point has its own row in the vector copy
            nb = mem.search(img[:64], "image", k=1, return_modality="text")  # copied vectors = the engine's
            for j in range(64):
                np.testing.assert_allclose(nb.vectors[j, 0], txt[want[nb.ids[j, 0]]], atol=1e-5)
            assert mem.backend.copy_doubt is None
        finally:
            mem.close()
    said = [str(w.message) for w in caught if "vector copy" in str(w.message)]
    assert not said, said
    problems = [f for f in check_memory(str(tmp_path / "m")) if f.level != "ok"]
    assert not [f for f in problems if f.level == "problem"], problems
