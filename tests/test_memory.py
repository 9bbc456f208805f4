"""Backend conformance (Qdrant Edge and qdrant-client local mode run the same suite) and memory rules."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BACKENDS, open_memory, random_pairs

from reco_qdrant.memory import EncoderMismatchError, Memory, MemoryInUseError, RecoMemoryError, point_id


def test_upsert_search_retrieve_count(memory):
    img, txt, caps = random_pairs()
    ids = memory.add_embeddings(img, txt, caps, ids=range(len(caps)), source="s",
                                payloads=[{"uri": f"file://{i}.jpg", "lang": "en"} for i in range(len(caps))])
    assert memory.count() == len(caps)
    nb = memory.search(img[:5], "image", k=3, return_modality="text")
    assert nb.ids.shape == (5, 3) and nb.scores.shape == (5, 3) and nb.vectors.shape == (5, 3, 16)
    assert list(nb.ids[:, 0]) == ids[:5]  # each image finds itself first
    np.testing.assert_allclose(nb.scores[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(nb.scores, axis=1) <= 1e-6)  # ranked
    np.testing.assert_allclose(nb.vectors[:, 0], txt[:5], atol=1e-5)  # return_modality gives the text vector
    assert nb.captions[0][0] == caps[0]
    assert nb.payloads[1][0] == {"caption": caps[1], "source": "s", "key": "1", "uri": "file://1.jpg", "lang": "en"}
    recs = memory.retrieve(ids[:2])
    assert {r.id for r in recs} == set(ids[:2])
    np.testing.assert_allclose(np.array(recs[0].vectors["image"]), img[ids.index(recs[0].id)], atol=1e-5)


def test_text_search_returns_image_vectors(memory):
    img, txt, caps = random_pairs()
    memory.add_embeddings(img, txt, caps, ids=range(len(caps)))
    nb = memory.search(txt[:4], "text", k=2, return_modality="image")
    np.testing.assert_allclose(nb.vectors[:, 0], img[:4], atol=1e-5)
    assert memory.search(txt[:4], "text", k=2, return_modality=None).vectors is None


def test_backends_agree_with_numpy_reference(tmp_path):
    img, txt, caps = random_pairs(500, seed=3)
    q = random_pairs(20, seed=4)[0]
    exact = np.argsort(-(q @ img.T), axis=1)[:, :10]
    for kind in BACKENDS:
        with open_memory(kind, tmp_path / kind) as mem:
            ids = mem.add_embeddings(img, txt, caps, ids=range(500))
            nb = mem.search(q, "image", k=10)
            expected = np.array(ids)[exact]
            assert (nb.ids == expected).mean() >= 0.99, kind


def test_ids_are_deterministic_and_reingest_updates(memory):
    img, txt, caps = random_pairs(50)
    a = memory.add_embeddings(img, txt, caps, ids=range(50), source="web")
    assert a[7] == point_id("web", 7) == point_id("web", "7")
    assert point_id("web", 7) != point_id("other", 7)
    b = memory.add_embeddings(img, txt, [c + " (fixed)" for c in caps], ids=range(50), source="web")
    assert a == b and memory.count() == 50
    assert memory.retrieve([a[0]])[0].payload["caption"] == caps[0] + " (fixed)"
    memory.add_embeddings(img, txt, caps)  # default ids: a hash of the content, stable too
    memory.add_embeddings(img, txt, caps)
    assert memory.count() == 100


def test_k_larger_than_memory_and_empty_memory(memory):
    img, txt, caps = random_pairs(5)
    with pytest.raises(RecoMemoryError, match="empty"):
        memory.search(img[:1], "image", k=1)
    memory.add_embeddings(img, txt, caps)
    with pytest.raises(ValueError, match="k=6 neighbours asked, but the memory holds 5"):
        memory.search(img[:1], "image", k=6)


@pytest.mark.parametrize("bad,match", [
    (lambda x: x.__setitem__((3, 2), np.nan) or x, "row 3 holds NaN or inf"),
    (lambda x: x.__setitem__((4, 0), np.inf) or x, "row 4 holds NaN or inf"),
    (lambda x: x.__setitem__(5, 0.0) or x, "row 5 is a zero vector"),
    (lambda x: x.astype(np.int64), "must be float"),
    (lambda x: x[:, :8], "dimension 8, expected 16"),
])
def test_bad_vectors_rejected_and_memory_intact(memory, bad, match):
    img, txt, caps = random_pairs(20)
    memory.add_embeddings(img, txt, caps, ids=range(20))
    with pytest.raises((ValueError, EncoderMismatchError), match=match):
        memory.add_embeddings(bad(img.copy()), txt, caps, ids=range(100, 120))
    assert memory.count() == 20


def test_empty_caption_and_count_mismatch(memory):
    img, txt, caps = random_pairs(10)
    caps[6] = "  "
    with pytest.raises(ValueError, match="row 6 has an empty"):
        memory.add_embeddings(img, txt, caps)
    with pytest.raises(ValueError, match="expected the same number"):
        memory.add_embeddings(img, txt[:9], caps)
    assert memory.count() == 0


def test_encoder_recorded_and_checked(memory):
    img, txt, caps = random_pairs(10)
    memory.add_embeddings(img, txt, caps, encoder_id="open_clip/ViT-B-32/laion2b_s34b_b79k")
    assert memory.encoder_record["id"] == "open_clip/ViT-B-32/laion2b_s34b_b79k"
    assert memory.dim == 16
    with pytest.raises(EncoderMismatchError, match="was built with encoder"):
        memory.add_embeddings(img, txt, caps, encoder_id="open_clip/RN50/openai")
    with pytest.raises(EncoderMismatchError, match="dimension 32, expected 16"):
        memory.add_embeddings(np.ones((1, 32)), np.ones((1, 32)), ["x"])


def test_migrations_ledger_idempotent(memory):
    img, txt, caps = random_pairs(10)
    memory.add_embeddings(img, txt, caps)
    info = memory.info()
    assert info["migrations"] == ["0001_create_memory", "0002_index_source", "0003_record_layout"]
    assert info["pending_migrations"] == [] and memory.migrate() == []


def test_info_never_shows_the_api_key(tmp_path):
    with Memory.open(":memory:", api_key="s3cret-key") as mem:
        text = repr(mem.info()) + repr(mem.cfg)
    assert "s3cret" not in text


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_edge_memory_persists_across_processes(tmp_path):
    path = tmp_path / "mem"
    w = _run(f"""
        import numpy as np
        from reco_qdrant import Memory
        rng = np.random.default_rng(0)
        x = rng.standard_normal((200, 16)).astype('float32')
        with Memory.open({str(path)!r}) as m:
            m.add_embeddings(x, x[::-1].copy(), [f"c{{i}}" for i in range(200)], ids=range(200), source="p",
                             encoder_id="enc-a")
        np.save({str(tmp_path / 'x.npy')!r}, x)
    """)
    assert w.returncode == 0, w.stderr
    x = np.load(tmp_path / "x.npy")
    with Memory.open(str(path)) as m:
        assert m.count() == 200 and m.encoder_record["id"] == "enc-a"
        nb = m.search(x[:3], "image", k=1)
        assert nb.captions == [["c0"], ["c1"], ["c2"]]
        np.testing.assert_allclose(nb.vectors[:, 0], x[::-1][:3] / np.linalg.norm(x[::-1][:3], axis=1)[:, None],
                                   atol=1e-5)


def test_second_process_gets_in_use_error(tmp_path):
    path = tmp_path / "mem"
    with Memory.open(str(path)) as m:
        m.add_embeddings(*random_pairs(5))
        r = _run(f"""
            from reco_qdrant import Memory, MemoryInUseError
            try:
                Memory.open({str(path)!r})
            except MemoryInUseError as e:
                print("IN USE:", e)
        """)
        assert "IN USE:" in r.stdout and "in use by another process" in r.stdout, r.stderr
    with Memory.open(str(path)) as m:  # released on close
        assert m.count() == 5


def test_same_process_second_open_is_refused(tmp_path):
    with Memory.open(str(tmp_path / "m")):
        with pytest.raises(MemoryInUseError):
            Memory.open(str(tmp_path / "m"))


def test_memory_filled_from_python_is_indexed_before_its_first_search(tmp_path, capsys):
    from reco_qdrant.memory import EXACT_SEARCH_BELOW

    n = EXACT_SEARCH_BELOW + 5000
    img, txt, caps = random_pairs(n, d=128, seed=3)  # above the engine's indexing threshold (10 MB a vector)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps, ids=[str(i) for i in range(n)], source="py")
        assert mem.backend.status()["indexed_vectors"] == 0  # nothing indexed yet: writes stay cheap
        exact = mem.search(img[:50], "image", 10, exact=True)
        assert mem.backend.status()["indexed_vectors"] == 2 * n  # the first search built the index first
        assert "indexing 50,000 vectors of 25,000 points" in capsys.readouterr().err
        nb = mem.search(img[:50], "image", 10, hnsw_ef=400)  # random 128-d data: the hardest case for HNSW
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nb.ids, exact.ids)])
        assert recall >= 0.95
        # int8 by default: the index searches quantised vectors (a self-match scores below 1 without
        # rescoring), and what reaches the caller is rescored on the float vectors, as exact search is
        assert mem.cfg.quantization == "int8" and mem.backend.stored_quantization() == "int8"
        qe = mem.backend.qe
        raw = qe.SearchParams(hnsw_ef=400, quantization=qe.QuantizationSearchParams(rescore=False))
        hits = mem.backend.shard.query_batch(qe.QueryBatchRequest([qe.QueryRequest(
            limit=1, query=qe.Query.Nearest(x, using="image"), params=raw) for x in img[:50].tolist()]))
        assert np.median([abs(h[0].score - 1.0) for h in hits]) > 1e-4
        np.testing.assert_allclose(nb.scores[:, 0], 1.0, atol=1e-5)
        x = img[:50] / np.linalg.norm(img[:50], axis=1, keepdims=True)
        y = img / np.linalg.norm(img, axis=1, keepdims=True)
        np.testing.assert_allclose(exact.scores, -np.sort(-(x @ y.T), axis=1)[:, :10], atol=1e-5)
        mem.add_embeddings(img[:100], txt[:100], caps[:100], ids=[f"more{i}" for i in range(100)], source="py")
        mem.search(img[:5], "image", 10)  # a few unindexed points: searched exactly, no rebuild
        assert "indexing" not in capsys.readouterr().err
    with Memory.open(str(tmp_path / "m2"), auto_index=False) as mem:
        mem.add_embeddings(img, txt, caps, ids=[str(i) for i in range(n)], source="py")
        mem.search(img[:5], "image", 10)
        assert mem.backend.status()["indexed_vectors"] == 0  # asked not to


@pytest.mark.parametrize("where", ["own copy", "written copy", "server"])
def test_vector_columns_follow_the_memory(tmp_path, where):
    """Columns gather the engine's vectors by id: from an embedded memory's own copy (nothing written), else from
    a copy written under the directory, reused while the memory is unchanged and replaced when it changes."""
    img, txt, caps = random_pairs(300, seed=4)
    location = ":memory:" if where == "server" else str(tmp_path / "m")
    with Memory.open(location, **({"vector_copy": False} if where == "written copy" else {})) as mem:
        pids = mem.add_embeddings(img, txt, caps, ids=[str(i) for i in range(300)], source="s")
        cols = mem.vector_columns(tmp_path / "cols", progress=False)
        picked = np.array([[pids[5], pids[299]], [pids[0], ""]])
        got = cols.gather(picked, "text")
        np.testing.assert_array_equal(got[0], _engine_vectors(mem, picked[0], "text"))
        assert got.dtype == np.float32 and not got[1, 1].any()  # no hit: zeros
        if where == "own copy":
            assert cols.copy is mem.backend.copy and not (tmp_path / "cols").exists()
        else:
            assert mem.vector_columns(tmp_path / "cols", progress=False).ids.tolist() == cols.ids.tolist()  # reused
        new = mem.add_embeddings(img[:1], txt[:1], ["a new pair"], ids=["new"], source="s")
        with pytest.raises(RecoMemoryError, match="stale"):
            cols.gather(np.array(new), "image")  # old columns do not know the new point
        new_txt = random_pairs(3, seed=5)[1]
        mem.add_embeddings(img[:3], new_txt, caps[:3], ids=["0", "1", "2"], source="s")  # rewritten points
        fresh = mem.vector_columns(tmp_path / "cols", progress=False)
        np.testing.assert_allclose(fresh.gather(np.array(new), "image")[0], img[0], atol=1e-6)
        np.testing.assert_allclose(fresh.gather(np.array(pids[:3]), "text"), new_txt, atol=1e-6)
        if where != "own copy":
            assert len(list((tmp_path / "cols").iterdir())) == 1  # the stale version was removed


def test_written_vector_columns_survive_damage_pruning_and_an_empty_memory(tmp_path):
    img, txt, caps = random_pairs(200, seed=4)
    with Memory.open(":memory:") as a, Memory.open(str(tmp_path / "b"), vector_copy=False) as b:
        a_ids = a.add_embeddings(img[:100], txt[:100], caps[:100], ids=range(100), source="s")
        b.add_embeddings(img[100:], txt[100:], caps[100:], ids=range(100), source="s")
        cols = a.vector_columns(tmp_path / "cols", progress=False)
        b.vector_columns(tmp_path / "cols", progress=False)  # keep=1: prunes a's directory
        assert len(list((tmp_path / "cols").iterdir())) == 1
        np.testing.assert_array_equal(cols.gather(np.array(a_ids), "image"), _engine_vectors(a, np.array(a_ids),
                                                                                                 "image"))
        for damage in ("truncated ids", "lost file"):
            (path,) = [p for p in (tmp_path / "cols").iterdir()]
            if damage == "truncated ids":
                (path / "ids.npy").write_bytes((path / "ids.npy").read_bytes()[:90])
            else:
                (path / "text.f32").unlink()
            again = b.vector_columns(tmp_path / "cols", progress=False)  # written again, not an error
            assert len(again.ids) == 100 and again.copy.rows == 100
    with Memory.open(str(tmp_path / "never written")) as mem, pytest.raises(RecoMemoryError, match="no points yet"):
        mem.vector_columns(tmp_path / "cols2")
    with Memory.open(str(tmp_path / "empty")) as mem:
        mem.delete(mem.add_embeddings(img[:1], txt[:1], caps[:1], ids=["x"], source="s"))
        assert mem.count() == 0
        cols = mem.vector_columns(tmp_path / "cols2", progress=False)
        assert cols.gather(np.array([["", ""]]), "text").shape == (1, 2, mem.dim)
        assert not (tmp_path / "cols2").exists()


def test_vector_columns_leave_a_damaged_copy_for_the_engines_vectors(tmp_path):
    img, txt, caps = random_pairs(300, seed=4)
    with Memory.open(str(tmp_path / "m")) as mem:
        pids = mem.add_embeddings(img, txt, caps, ids=range(300), source="s")
        for name in ("image", "text"):  # rows of other pairs, as after damage on disk
            f = mem.backend.copy_path / f"{name}.f32"
            f.write_bytes(np.roll(np.fromfile(f, np.float32).reshape(300, -1), 1, axis=0).tobytes())
        with pytest.warns(UserWarning, match="vector copy .* is out of step") as caught:
            cols = mem.vector_columns(tmp_path / "cols", progress=False)
        assert caught[0].filename == __file__  # the warning names the caller's line
        assert mem.backend.copy_doubt and cols.copy is not mem.backend.copy
        np.testing.assert_array_equal(cols.gather(np.array(pids), "text"), _engine_vectors(mem, np.array(pids), "text"))


# ---------------------------------------------------------------------------- the vector copy (Edge)


def _engine_vectors(mem: Memory, ids: np.ndarray, modality: str) -> np.ndarray:
    """The hits' vectors as the engine holds them (read by id, not through the copy)."""
    recs = {r.id: r.vectors[modality] for r in mem.retrieve(list(ids.ravel()))}
    return np.array([recs[i] for i in ids.ravel()], np.float32).reshape(*ids.shape, -1)


def test_hits_vectors_come_from_the_copy_and_equal_the_engines(tmp_path):
    img, txt, caps = random_pairs(400, seed=5)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(400), source="s", payloads=[{"_copy": [7, 0]}] * 400)
        assert mem.backend.copy.rows == 400
        nb = mem.search(img[:20], "image", k=5, return_modality="text", with_searched_vectors=True)
        assert mem.backend.copy_doubt is None  # served from the copy
        np.testing.assert_allclose(nb.vectors, _engine_vectors(mem, nb.ids, "text"), atol=1e-6)
        np.testing.assert_allclose(nb.searched_vectors, _engine_vectors(mem, nb.ids, "image"), atol=1e-6)
        assert all("_copy" not in p for row in nb.payloads for p in row)  # ours, never shown (nor taken from users)
        assert nb.payloads[0][0] == {"caption": caps[0], "source": "s", "key": "0"}
        assert all("_copy" not in r.payload for r in mem.retrieve(list(nb.ids[0])))
        bare = mem.search(txt[:3], "text", k=4, return_modality="image", with_payload=False)
        assert bare.payloads == [[{}] * 4] * 3
        np.testing.assert_allclose(bare.vectors, _engine_vectors(mem, bare.ids, "image"), atol=1e-6)
        # a rewritten point names its new rows: never the old vectors
        new_txt = random_pairs(400, seed=6)[1]
        mem.add_embeddings(img[:10], new_txt[:10], caps[:10], ids=range(10), source="s")
        nb = mem.search(img[:10], "image", k=1, return_modality="text")
        np.testing.assert_allclose(nb.vectors[:, 0], new_txt[:10], atol=1e-6)
        assert mem.info()["vector_copy_rows"] == 410 and mem.backend.copy_doubt is None  # old rows: garbage


def test_copy_checksums_are_zlibs_crc32_of_the_rows_vectors(tmp_path):
    """Entries written by any release (zlib, or the faster ISA-L CRC-32) must read in every other."""
    import zlib

    from reco_qdrant.vector_copy import VectorCopy

    img, txt, _ = random_pairs(7, seed=2)
    entries = VectorCopy.create(tmp_path / "c", 16, ("image", "text")).append({"image": img, "text": txt})
    assert [e[0] for e in entries] == list(range(7))
    assert [e[1] for e in entries] == [zlib.crc32(t.tobytes(), zlib.crc32(i.tobytes())) for i, t in zip(img, txt)]
    copy = VectorCopy.open(tmp_path / "c", 16, ("image", "text"))
    np.testing.assert_array_equal(copy.read(np.array(entries[2:5]))["text"], txt[2:5])
    assert copy.read(np.array([[3, entries[3][1] ^ 1]])) is None  # a wrong checksum is caught


@pytest.mark.parametrize("damage", ["replaced", "truncated"])
def test_a_copy_out_of_step_is_noticed_and_the_engine_answers(tmp_path, damage):
    img, txt, caps = random_pairs(300, seed=7)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(300), source="s")
        copy = mem.backend.copy_path
    if damage == "replaced":  # rows of other pairs, as a copy from another memory would hold
        for name in ("image", "text"):
            f = copy / f"{name}.f32"
            f.write_bytes(np.roll(np.fromfile(f, np.float32).reshape(300, -1), 1, axis=0).tobytes())
    else:  # a crash lost its tail; new pairs then reuse those row numbers
        for name in ("image", "text"):
            with open(copy / f"{name}.f32", "r+b") as f:
                f.truncate(150 * 16 * 4 + 10)
    with pytest.warns(UserWarning, match="vector copy .* is out of step"):  # found on opening (a sample)
        mem = Memory.open(str(tmp_path / "m"))
    with mem:
        more_img, more_txt, _ = random_pairs(100, seed=8)
        mem.add_embeddings(more_img, more_txt, [f"more {i}" for i in range(100)], ids=range(100), source="more")
        nb = mem.search(img, "image", k=3, return_modality="text", with_searched_vectors=True)
        np.testing.assert_allclose(nb.vectors, _engine_vectors(mem, nb.ids, "text"), atol=1e-6)
        np.testing.assert_allclose(nb.searched_vectors[:, 0], img, atol=1e-6)
        assert mem.backend.copy_doubt


def test_a_copy_found_out_of_step_by_a_search_warns_at_the_callers_line(tmp_path):
    img, txt, caps = random_pairs(300, seed=7)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(300), source="s")
        for name in ("image", "text"):  # damaged after opening: the search finds it
            f = mem.backend.copy_path / f"{name}.f32"
            f.write_bytes(np.roll(np.fromfile(f, np.float32).reshape(300, -1), 1, axis=0).tobytes())
        with pytest.warns(UserWarning, match="vector copy .* is out of step") as caught:
            nb = mem.search(img[:5], "image", k=3, return_modality="text")
        assert caught[0].filename == __file__
        np.testing.assert_allclose(nb.vectors[:, 0], txt[:5], atol=1e-6)


def test_memory_without_a_copy_keeps_none(tmp_path):
    img, txt, caps = random_pairs(100, seed=9)
    with Memory.open(str(tmp_path / "m"), vector_copy=False) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(100))
    with Memory.open(str(tmp_path / "m")) as mem:  # reopened with defaults: still without (fixed at creation)
        assert mem.backend.copy is None and not mem.backend.copy_path.exists()
        mem.add_embeddings(img[:5], txt[:5], caps[:5], ids=range(5))
        np.testing.assert_allclose(mem.search(img[:5], "image", 1, "text").vectors[:, 0], txt[:5], atol=1e-6)
    with Memory.open(str(tmp_path / "c")) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(100))
    with pytest.raises(ValueError, match=r"vector_copy=False \(created with True\)"):
        Memory.open(str(tmp_path / "c"), vector_copy=False)
