"""Regression tests for the code review's silent overwrites and silent wrong answers (issue 14), one
test per defect, named after it. Each failed on reco-qdrant 0.1 and passes now."""

from __future__ import annotations

import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import open_memory, random_pairs
from test_ingest import image_bytes, make_shards, write_tar
from typer.testing import CliRunner

from reco_qdrant import Memory, MemoryDamagedError, train_fusion
from reco_qdrant.cli import app
from reco_qdrant.evaluation import recall_at_k
from reco_qdrant.ingest import ingest
from reco_qdrant.memory import EncoderMismatchError, UnverifiedEncoderWarning, point_id
from reco_qdrant.neighbors import retrieve
from reco_qdrant.sources import EmbeddingShards, WebDataset, write_embedding_shards
from reco_qdrant.synthetic import make_world
from reco_qdrant.training import TrainConfig, neighbour_cache, param_groups

runner = CliRunner()
LEGACY = Path(__file__).parent / "data" / "legacy_memory_v0.1.0.tar.gz"  # written by reco-qdrant 0.1 (int8,
# encoder "unspecified", 40 points of source "embeddings" from cub/embeddings in 2 shards of 20)


@pytest.fixture(scope="module")
def small_world():
    return make_world(classes_per_super=8, memory_per_class=12, train_per_class=12, eval_per_class=4)


def fill(mem, w):
    mem.add_embeddings(w.memory_image, w.memory_text, w.memory_captions, ids=w.memory_ids, source="synthetic",
                       encoder_id="synthetic")
    return mem


def legacy_copy(tmp_path) -> Path:
    with tarfile.open(LEGACY) as t:
        t.extractall(tmp_path, filter="data")
    return tmp_path


# ----------------------------------------------------------------------------- 1: ingest overwrites


def test_1_two_folders_named_alike_are_two_sources(tmp_path):
    make_shards(tmp_path / "cub" / "embeddings", n=100, shard_size=100, seed=0)
    make_shards(tmp_path / "flowers" / "embeddings", n=100, shard_size=100, seed=1)
    with Memory.open(str(tmp_path / "m")) as mem:
        a = ingest(mem, EmbeddingShards(tmp_path / "cub" / "embeddings"), progress=False)
        b = ingest(mem, EmbeddingShards(tmp_path / "flowers" / "embeddings"), progress=False)
        assert (a.added, b.added, a.updated, b.updated) == (100, 100, 0, 0)
        assert mem.count() == 200
        cub = EmbeddingShards(tmp_path / "cub" / "embeddings")
        assert cub.name == str((tmp_path / "cub" / "embeddings").resolve())
        assert mem.count(cub.name) == 100
        again = ingest(mem, cub, progress=False, resume=False)  # the same data again: an update, said so
        assert (again.added, again.updated, mem.count()) == (0, 100, 200)


def test_1_webdataset_shards_named_alike_are_kept_apart(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        members = {f"s{i}.{ext}": data for i in range(3)
                   for ext, data in (("png", image_bytes((i * 50, 0, 0))), ("txt", f"{split} {i}".encode()))}
        write_tar(tmp_path / split / "00000.tar", members)
    from reco_qdrant.encoders import load_encoder

    enc = load_encoder("reco-tiny", None, device="cpu")
    with Memory.open(str(tmp_path / "m")) as mem:
        for split in ("train", "val"):  # apart: two sources
            assert ingest(mem, WebDataset([tmp_path / split / "00000.tar"]), enc, progress=False).added == 3
        assert mem.count() == 6
    with Memory.open(str(tmp_path / "m2")) as mem:  # together: one source, keys carry the shard's folder
        src = WebDataset([tmp_path / "train" / "00000.tar", tmp_path / "val" / "00000.tar"])
        assert ingest(mem, src, enc, progress=False).added == 6 and mem.count() == 6


def test_1_empty_and_duplicate_keys_are_rejected(tmp_path):
    img, txt, caps = random_pairs(6)
    write_embedding_shards(tmp_path / "e", img, txt, caps, extra={"key": ["a", "b", "", None, "e", "f"]})
    with Memory.open(str(tmp_path / "m")) as mem:
        with pytest.raises(ValueError, match=r"metadata_0.parquet column 'key': row 2 has an empty key"):
            list(EmbeddingShards(tmp_path / "e", key_column="key").batches())
        write_embedding_shards(tmp_path / "d", img, txt, caps, extra={"key": ["a", "b", "c", "a", "e", "f"]})
        with pytest.raises(ValueError, match=r"rows 0 and 3 have the same key 'a'"):
            ingest(mem, EmbeddingShards(tmp_path / "d", key_column="key"), progress=False)
        assert mem.count() == 0


def test_1_cli_reports_updates(tmp_path):
    make_shards(tmp_path / "e", n=50, shard_size=50)
    args = ["ingest", "embeddings", str(tmp_path / "e"), "--memory", str(tmp_path / "m"), "--no-progress", "--json"]
    import json

    assert json.loads(runner.invoke(app, args).stdout)["added"] == 50
    r = runner.invoke(app, args + ["--restart"])
    rep = json.loads(r.stdout)
    assert (rep["added"], rep["updated"], rep["count"]) == (0, 50, 50)


def test_1_memory_of_version_0_1_is_not_duplicated_by_the_new_source_names(tmp_path):
    root = legacy_copy(tmp_path)
    with Memory.open(str(root / "mem")) as mem:
        assert mem.count() == 40 and mem.count("embeddings") == 40
        with pytest.raises(ValueError, match=r"holds 40 points of source 'embeddings'.*pass source='embeddings'"):
            ingest(mem, EmbeddingShards(root / "cub" / "embeddings"), progress=False)
        assert mem.count() == 40
        rep = ingest(mem, EmbeddingShards(root / "cub" / "embeddings", source="embeddings"), progress=False)
        assert (rep.added, rep.updated, mem.count()) == (0, 40, 40)


# ----------------------------------------------------------------------------- 2: stale training resume


def test_2_rerun_of_training_on_other_inputs_is_refused_or_restarted(small_world, tmp_path):
    w = small_world
    kw = dict(labels=w.train_labels, class_embeddings=w.class_text, epochs=1, progress=False, device="cpu",
              out_dir=str(tmp_path / "run"))
    with fill(Memory.open(str(tmp_path / "m")), w) as mem:
        first = train_fusion(mem, w.train_image, w.train_text, **kw)
        same = train_fusion(mem, w.train_image, w.train_text, **kw)  # the same run: resumed (finished), same model
        for k, v in first.state_dict().items():
            torch.testing.assert_close(same.state_dict()[k], v, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"changed: setting lr"):
            train_fusion(mem, w.train_image, w.train_text, **{**kw, "lr": 1e-3})
        with pytest.raises(ValueError, match=r"changed: training pairs"):
            train_fusion(mem, w.train_image[::-1], w.train_text[::-1], **{**kw, "labels": w.train_labels[::-1]})
        with pytest.raises(ValueError, match=r"changed: .*setting seed"):
            train_fusion(mem, w.train_image, w.train_text, **{**kw, "seed": 1})
        fresh = train_fusion(mem, w.train_image, w.train_text, **{**kw, "seed": 1, "on_mismatch": "restart"})
        assert fresh.history[-1]["epoch"] == 1
        assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in first.state_dict().items())
        mem.add_embeddings(w.memory_image[:3], w.memory_text[:3], ["x", "y", "z"], ids=["n1", "n2", "n3"])
        with pytest.raises(ValueError, match=r"changed: memory \(id and write version\)"):
            train_fusion(mem, w.train_image, w.train_text, **{**kw, "seed": 1})


def test_2_cli_train_refuses_another_run_and_restarts_on_request(small_world, tmp_path):
    w = small_world
    write_embedding_shards(tmp_path / "pairs", w.train_image, w.train_text, [f"c{i}" for i in range(len(w.train_ids))],
                           extra={"label": [str(x) for x in w.train_labels]})
    mem = str(tmp_path / "m")
    with fill(Memory.open(mem), w):
        pass
    base = ["train", str(tmp_path / "pairs"), "--out", str(tmp_path / "run"), "--memory", mem, "--epochs", "1",
            "--label-column", "label", "--no-progress", "--json", "--device", "cpu"]
    assert runner.invoke(app, base).exit_code == 0
    r = runner.invoke(app, base + ["--lr", "0.001"])
    assert r.exit_code == 1 and "changed: setting lr" in " ".join(r.output.split()), r.output
    assert runner.invoke(app, base + ["--lr", "0.001", "--restart"]).exit_code == 0


# ----------------------------------------------------------------------------- 3: stale neighbour cache


def test_3_neighbour_cache_follows_memory_writes(tmp_path):
    img, txt, caps = random_pairs(200, seed=0)
    cfg = TrainConfig(k=5, cache_dir=str(tmp_path / "c"), progress=False, self_exclusion=False)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps, ids=list(range(200)))
        q = img[:20]
        old = np.asarray(neighbour_cache(mem, q, "image", cfg, None)[0], np.float32)
        new_txt = random_pairs(200, seed=5)[1]
        mem.add_embeddings(img, new_txt, caps, ids=list(range(200)))  # same keys, same count, new text vectors
        assert mem.count() == 200
        cached = np.asarray(neighbour_cache(mem, q, "image", cfg, None)[0], np.float32)
        fresh = mem.search(q, "image", 5, "text").vectors
        np.testing.assert_allclose(cached, fresh, atol=2e-3)  # float16 cache
        assert not np.allclose(cached, old, atol=2e-3)
        mem.delete([point_id("default", k) for k in range(10)])  # delete 10 and add 10: same count again
        more_img, more_txt, _ = random_pairs(10, seed=9)
        mem.add_embeddings(more_img, more_txt, caps[:10], ids=list(range(500, 510)))
        after = np.asarray(neighbour_cache(mem, q, "image", cfg, None)[0], np.float32)
        np.testing.assert_allclose(after, mem.search(q, "image", 5, "text").vectors, atol=2e-3)


def test_3_neighbour_cache_lives_beside_the_run_and_is_pruned(tmp_path):
    img, txt, caps = random_pairs(100)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps)
        cfg = TrainConfig(k=5, out_dir=str(tmp_path / "run"), cache_keep=2, progress=False)
        for s in range(4):
            neighbour_cache(mem, img[s * 10:(s + 1) * 10], "image", cfg, None)
    kept = sorted((tmp_path / "run" / "cache" / "neighbours").glob("*.vectors.npy"))
    assert len(kept) == 2 and len(list((tmp_path / "run" / "cache" / "neighbours").glob("*.mask.npy"))) == 2


# ----------------------------------------------------------------------------- 4: unchecked training inputs


def test_4_train_fusion_normalises_and_checks_its_inputs(small_world, tmp_path):
    w = small_world
    kw = dict(labels=w.train_labels, class_embeddings=w.class_text, epochs=1, progress=False, device="cpu",
              cache_dir=str(tmp_path / "c"))
    with fill(Memory.open(str(tmp_path / "m")), w) as mem:
        a = train_fusion(mem, w.train_image, w.train_text, **kw)
        b = train_fusion(mem, 4 * w.train_image, 4 * w.train_text, **kw)  # scaled: trained as if normalised
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v)
        ids = [point_id("synthetic", i) for i in w.train_ids]
        with pytest.raises(ValueError, match=r"\d+ ids for \d+ pairs"):
            train_fusion(mem, w.train_image, w.train_text, ids=ids + ids[:1], **kw)
        with pytest.raises(ValueError, match=r"labels run from 1 to 64, but there are 64 class embeddings"):
            train_fusion(mem, w.train_image, w.train_text, **{**kw, "labels": w.train_labels + 1})
        with pytest.raises(ValueError, match=r"row 3 holds NaN"):
            bad = w.train_image.copy()
            bad[3, 0] = np.nan
            train_fusion(mem, bad, w.train_text, **kw)


# ----------------------------------------------------------------------------- 5: "unspecified" encoder


def test_5_unspecified_encoder_is_pinned_by_the_first_named_one(tmp_path):
    img, txt, caps = random_pairs(20)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps)  # no encoder id: recorded as unspecified
        assert mem.encoder_record["id"] == "unspecified"
        with pytest.warns(UnverifiedEncoderWarning, match="records no encoder id"):
            mem.check_encoder("open_clip/ViT-B-32/laion2b_s34b_b79k", 16)  # a read cannot be checked: said so
        mem.add_embeddings(img, txt, caps, encoder_id="open_clip/ViT-B-32/openai")  # the first named write pins it
        assert mem.encoder_record["id"] == "open_clip/ViT-B-32/openai"
        with pytest.raises(EncoderMismatchError, match="built with encoder 'open_clip/ViT-B-32/openai'"):
            mem.check_encoder("open_clip/ViT-B-32/laion2b_s34b_b79k", 16)
    with Memory.open(str(tmp_path / "m")) as mem, warnings.catch_warnings():
        warnings.simplefilter("error")
        mem.check_encoder("open_clip/ViT-B-32/openai", 16)  # pinned across processes, no warning


def test_5_reco_migrate_pins_an_unspecified_memory(tmp_path):
    root = legacy_copy(tmp_path)
    mem = str(root / "mem")
    r = runner.invoke(app, ["migrate", "--memory", mem, "--dim", "16", "--encoder-id", "open_clip/ViT-B-32/openai"])
    assert r.exit_code == 0, r.output
    with Memory.open(mem) as m:
        assert m.encoder_record["id"] == "open_clip/ViT-B-32/openai" and m.count() == 40
        with pytest.raises(EncoderMismatchError):
            m.check_encoder("open_clip/ViT-B-32/laion2b_s34b_b79k", 16)


# ----------------------------------------------------------------------------- 6: recall@k


def test_6_recall_at_k_counts_ties_as_misses_and_checks_its_inputs():
    rng = np.random.default_rng(0)
    collapsed = np.tile(rng.standard_normal((1, 8)).astype(np.float32), (50, 1))
    r = recall_at_k(collapsed, collapsed)
    assert r == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0}
    x = rng.standard_normal((50, 8)).astype(np.float32)
    assert recall_at_k(x, x)["R@1"] == 1.0
    assert recall_at_k(3 * x, x) == recall_at_k(x, x)  # unnormalised inputs are normalised first
    with pytest.raises(ValueError, match="50 queries but 49 targets"):
        recall_at_k(x, x[:49])


# ----------------------------------------------------------------------------- 7: cross-modal self-exclusion


def test_7_cross_modal_search_excludes_the_query_own_pair_without_ids(tmp_path):
    img, txt, caps = random_pairs(200, seed=3)
    with Memory.open(str(tmp_path / "m")) as mem:
        pids = mem.add_embeddings(img, txt, caps, ids=list(range(200)))
        q = img[:40]
        plain = retrieve(mem, q, "image", 5, search="cross")
        assert (plain.ids == np.array(pids[:40])[:, None]).any(1).mean() > 0.5  # own pair found without exclusion
        nb = retrieve(mem, q, "image", 5, search="cross", dedup_threshold=0.98)
        assert not (nb.ids == np.array(pids[:40])[:, None]).any() and nb.mask.all()
        nb = retrieve(mem, txt[:40], "text", 5, search="cross", dedup_threshold=0.98)
        assert not (nb.ids == np.array(pids[:40])[:, None]).any() and nb.mask.all()


# ----------------------------------------------------------------------------- 8: deleted collection


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_8_deleted_collection_with_surviving_metadata_is_recreated(tmp_path, kind):
    make_shards(tmp_path / "e", n=60, shard_size=60)
    src = EmbeddingShards(tmp_path / "e")
    loc = str(tmp_path / "m") if kind == "edge" else ":memory:"
    mem = Memory.open(loc)
    assert ingest(mem, src, progress=False).added == 60
    if kind == "edge":
        mem.close()
        shutil.rmtree(tmp_path / "m" / "reco_memory")  # the data, not the ledger
        with pytest.raises(MemoryDamagedError, match="acknowledged 60"):  # the loss is said, not hidden (issue 29)
            Memory.open(loc)
        with pytest.warns(UserWarning, match="is gone but its ledger survived"):  # re-created when asked to
            mem = Memory.open(loc, accept_count=True)
    else:
        mem.backend.client.delete_collection("reco_memory")
        with pytest.warns(UserWarning, match="is gone but its ledger survived"):
            mem.migrate()
    assert mem.count() == 0 and mem.backend.has_collection()
    rep = ingest(mem, src, progress=False)  # the old ingest ledger does not skip anything
    assert (rep.added, rep.skipped_batches, mem.count()) == (60, 0, 60)
    mem.close()


# ----------------------------------------------------------------------------- 9: checkpoint rotation


def test_9_checkpoint_rotation_survives_a_kill_at_either_rename(small_world, tmp_path):
    w = small_world
    kw = dict(labels=w.train_labels, class_embeddings=w.class_text, epochs=2, patience=10, progress=False,
              device="cpu", cache_dir=str(tmp_path / "c"))
    with fill(Memory.open(str(tmp_path / "m")), w) as mem:
        clean = train_fusion(mem, w.train_image, w.train_text, out_dir=str(tmp_path / "clean"), **kw)
        one = {**kw, "epochs": 2}
        run = tmp_path / "run"
        train_fusion(mem, w.train_image, w.train_text, out_dir=str(run), **{**one, "epochs": 2})
        # a kill between `rename(last, .last.old)` and `rename(.last.tmp, last)`: no last/, a stale .old
        shutil.copytree(run / "last", run / ".last.tmp")
        (run / "last").rename(run / ".last.old")
        (run / ".best.old").mkdir()  # and a leftover from a kill after the second rename
        resumed = train_fusion(mem, w.train_image, w.train_text, out_dir=str(run), **one)
        assert (run / "last").is_dir() and not (run / ".last.old").exists() and not (run / ".best.old").exists()
        assert resumed.history[-1]["epoch"] == 2
        for k, v in clean.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 10: collection settings


def test_10_int8_memory_reopened_without_settings_keeps_them(tmp_path):
    img, txt, caps = random_pairs(50)
    with Memory.open(str(tmp_path / "m"), quantization="int8") as mem:
        mem.add_embeddings(img, txt, caps)
    with Memory.open(str(tmp_path / "m")) as mem:
        assert mem.cfg.quantization == "int8" and mem.backend.cfg.quantization == "int8"
        assert mem.info()["quantization"] == "int8"
    with pytest.raises(ValueError, match=r"hnsw_m=32 \(created with 16\)"):
        Memory.open(str(tmp_path / "m"), hnsw_m=32)
    with Memory.open(str(tmp_path / "f"), quantization=None) as mem:  # int8 is the default; float on request
        mem.add_embeddings(img, txt, caps)
    with Memory.open(str(tmp_path / "f")) as mem:
        assert mem.cfg.quantization is None and mem.backend.stored_quantization() is None


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_10_binary_memory_is_searched_with_rescoring_and_keeps_its_setting(tmp_path, kind):
    from reco_qdrant.memory import EXACT_SEARCH_BELOW

    # past the engine's indexing threshold (10 MB a vector) on Edge: the index is what gets searched
    n = EXACT_SEARCH_BELOW + 5000 if kind == "edge" else 300
    rng = np.random.default_rng(4)  # clustered, as embeddings are (uniform random vectors defeat 2-bit codes)
    img = rng.standard_normal((n // 50 + 1, 128))[rng.integers(0, n // 50 + 1, n)] + 0.5 * rng.standard_normal((n, 128))
    img = (img / np.linalg.norm(img, axis=1, keepdims=True)).astype(np.float32)
    _, txt, caps = random_pairs(n, d=128, seed=4)
    with open_memory(kind, tmp_path, quantization="binary") as mem:
        mem.add_embeddings(img, txt, caps, ids=range(n), source="b")
        assert mem.info()["quantization"] == "binary"
        from reco_qdrant.backends.base import search_params

        assert search_params(mem.backend.m if kind == "local" else mem.backend.qe, mem.cfg, 10, False,
                             None).quantization.oversampling == 6.0  # measured: 2x keeps recall@10 at 0.88
        assert kind == "local" or mem.backend.stored_quantization() == "binary"  # local mode keeps no quantization
        exact = mem.search(img[:40], "image", 10, exact=True)
        nb = mem.search(img[:40], "image", 10, hnsw_ef=200)
        assert kind == "local" or mem.backend.status()["indexed_vectors"] == 2 * n
        np.testing.assert_allclose(nb.scores[:, 0], 1.0, atol=1e-5)  # rescored on the float vectors
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nb.ids, exact.ids)])
        assert recall >= 0.9, recall  # 2 bits a dimension, oversampled, rescored
        if kind == "local":
            return
    with Memory.open(str(tmp_path / "mem")) as mem:  # reopened without settings: still binary, still rescored
        assert mem.cfg.quantization == "binary"
        np.testing.assert_allclose(mem.search(img[:5], "image", 1).scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"quantization=None \(created with 'binary'\)"):
        Memory.open(str(tmp_path / "mem"), quantization=None)
    with Memory.open(str(tmp_path / "other"), quantization="int4") as bad, pytest.raises(
            ValueError, match=r"quantization 'int4' not supported: expected None, 'int8' or 'binary'"):
        bad.add_embeddings(img[:2], txt[:2], caps[:2])


def test_10_memory_of_version_0_1_gets_its_settings_recorded(tmp_path):
    root = legacy_copy(tmp_path)
    with Memory.open(str(root / "mem")) as mem:  # migration 0003 reads the quantization back from the engine
        assert "0003_record_layout" in mem.info()["migrations"]
        assert mem.cfg.quantization == "int8" and mem.count() == 40
        q = mem.retrieve([mem.search(np.eye(16, dtype=np.float32)[:1], "image", 1).ids[0, 0]])[0]
        assert q.payload["caption"].startswith("a cub caption")


# ----------------------------------------------------------------------------- 11: weight decay


def test_11_no_weight_decay_on_temperature_norms_biases_and_embeddings():
    from reco_qdrant.fusion import FusionConfig, FusionModel

    def groups(aggregator):
        model = FusionModel(FusionConfig(dim=32, n_heads=4, aggregator=aggregator))
        names = {id(p): n for n, p in model.named_parameters()}
        decayed, free = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.05))
        assert decayed | free == set(names.values()) and not decayed & free
        assert all(n.endswith("weight") and "ln" not in n for n in decayed)
        return decayed, free

    decayed, free = groups("transformer")
    assert {"logit_scale", "phi_img.type_emb", "phi_img.pos_emb", "phi_img.blocks.0.ln1.weight"} <= free
    assert all(("ln" in n or n.endswith("bias")) for n in free if "." in n and not n.endswith("_emb"))
    assert "phi_img.blocks.0.attn.in_proj_weight" in decayed
    decayed, free = groups("relevance")
    assert {"phi_img.score_scale", "phi_img.consensus_scale", "phi_img.rank_emb", "phi_img.gate.0.bias"} <= free
    assert {"phi_img.proj.weight", "phi_img.gate.0.weight"} <= decayed
