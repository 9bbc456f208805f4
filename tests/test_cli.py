"""The `reco` command, in-process with typer's CliRunner, on real memories and files."""

from __future__ import annotations

import json
import re

import numpy as np
from test_ingest import make_shards
from typer.testing import CliRunner

from reco_qdrant.cli import app

runner = CliRunner()


def test_migrate_ingest_info_search(tmp_path):
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["migrate", "--memory", mem, "--dim", "16", "--encoder-id", "enc", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["applied"] == ["0001_create_memory", "0002_index_source", "0003_record_layout"]
    r = runner.invoke(app, ["migrate", "--memory", mem, "--json"])
    assert json.loads(r.output)["applied"] == []
    make_shards(tmp_path / "laion", n=300)
    r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", mem, "--encoder-id", "enc",
                            "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["added"] == 300
    r = runner.invoke(app, ["info", "--memory", mem, "--json"], env={"RECO_API_KEY": "hush-hush"})
    info = json.loads(r.output)
    assert info["count"] == 300 and info["dim"] == 16 and info["encoder"]["id"] == "enc"
    assert "hush-hush" not in r.output and info["api_key_set"] is True
    assert info["quantization"] == "int8" and info["vector_copy_rows"] == 300  # the defaults
    r = runner.invoke(app, ["migrate", "--memory", str(tmp_path / "f"), "--dim", "16", "--quantization", "none",
                            "--no-vector-copy"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", "--memory", str(tmp_path / "f"), "--json"])
    assert json.loads(r.output)["quantization"] is None and json.loads(r.output)["vector_copy_rows"] is None


def test_search_with_tiny_encoder(tmp_path, tiny_encoder):
    mem = str(tmp_path / "m")
    from reco_qdrant import Memory

    caps = ["a red bird", "a blue flower", "a green car"]
    with Memory.open(mem) as m:
        m.add_embeddings(tiny_encoder.encode_texts(caps), tiny_encoder.encode_texts(caps), caps,
                         encoder_id=tiny_encoder.id)
    r = runner.invoke(app, ["search", "--text", "a blue flower", "--memory", mem, "--k", "2", "--model", "reco-tiny",
                            "--pretrained", "none", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)
    assert hits[0]["caption"] == "a blue flower" and hits[0]["score"] > 0.99 and len(hits) == 2


def test_errors_are_one_line_with_hint(tmp_path):
    make_shards(tmp_path / "laion", n=50, d=16)
    mem = str(tmp_path / "m")
    runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", mem, "--no-progress"])
    make_shards(tmp_path / "wide", n=5, d=32)
    r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "wide"), "--memory", mem, "--no-progress"])
    assert r.exit_code == 1
    assert "error:" in r.output and "dimension 32, expected 16" in r.output and "Traceback" not in r.output
    assert "hint:" in r.output
    r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "nothing"), "--memory", mem])
    assert r.exit_code == 1 and "no img_emb/img_emb_*.npy" in r.output
    r = runner.invoke(app, ["search", "--memory", mem, "--model", "reco-tiny", "--pretrained", "none"])
    assert r.exit_code == 1 and "exactly one of --text or --image" in r.output


def test_help_lists_the_workflow():
    r = runner.invoke(app, ["--help"])
    for cmd in ("migrate", "ingest", "info", "search", "train", "predict", "eval", "demo"):
        assert cmd in r.output


def test_demo_and_predict_from_its_checkpoint(tmp_path):
    r = runner.invoke(app, ["demo", "--memory", str(tmp_path / "m"), "--out", str(tmp_path / "run"),
                            "--no-ablations", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    base, reco = res["table"][0], res["table"][1]
    assert reco["top1"] >= base["top1"] + 0.25
    assert (tmp_path / "run" / "fusion" / "model.safetensors").exists()
    assert res["examples"][0]["neighbours"][0]["caption"]
    assert np.isfinite(res["ingest"]["items_per_s"])


def test_copy_embedded_to_server_api_and_back(tmp_path):
    """`reco copy` Edge -> qdrant-client (the server API, local mode) -> Edge: same ids, vectors, payloads."""
    from test_ingest import snapshot

    from reco_qdrant import Memory
    from reco_qdrant.ingest import copy_memory

    make_shards(tmp_path / "laion", n=700)
    a = str(tmp_path / "a")
    runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", a, "--encoder-id", "enc",
                        "--no-progress"])
    with Memory.open(a) as src, Memory.open(":memory:") as server, Memory.open(str(tmp_path / "b")) as back:
        assert copy_memory(src, server, batch=300) == 700
        assert copy_memory(server, back, batch=256) == 700
        assert copy_memory(server, back) == 700 and back.count() == 700  # idempotent
        want = snapshot(src)
        for got in (snapshot(server), snapshot(back)):  # Qdrant re-normalises cosine vectors: equal to 1 ulp
            assert got.keys() == want.keys()
            for pid, (im, tx, payload) in got.items():
                assert payload == want[pid][2]
                for x, y in ((im, want[pid][0]), (tx, want[pid][1])):
                    np.testing.assert_allclose(np.frombuffer(x, np.float32), np.frombuffer(y, np.float32), atol=1e-6)
        assert back.encoder_record["id"] == "enc"
    r = runner.invoke(app, ["copy", a, str(tmp_path / "c"), "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["dst_count"] == 700, r.output
    with Memory.open(a) as src, Memory.open(str(tmp_path / "c")) as c:
        assert snapshot(c) == snapshot(src)  # embedded -> embedded: bit for bit
    make_shards(tmp_path / "wide", n=5, d=32)
    runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "wide"), "--memory", str(tmp_path / "w"),
                        "--no-progress"])
    r = runner.invoke(app, ["copy", str(tmp_path / "w"), str(tmp_path / "c"), "--no-progress"])
    assert r.exit_code == 1 and "32-d" in r.output
    with Memory.open(str(tmp_path / "c")) as c:
        assert c.count() == 700  # the refused copy left the destination as it was


def test_dedup_removes_near_duplicates_of_eval_images(tmp_path):
    from reco_qdrant import Memory
    from reco_qdrant.sources import write_embedding_shards

    img, txt, caps = make_shards(tmp_path / "laion", n=600)
    mem = str(tmp_path / "m")
    runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", mem, "--no-progress"])
    rng = np.random.default_rng(5)
    dup_rows = rng.choice(600, 40, replace=False)
    # evaluation images: 40 slightly perturbed copies of memory images (cosine ~0.99) + 20 unrelated ones
    ev = np.concatenate([img[dup_rows] + 0.01 * rng.standard_normal((40, 16)), rng.standard_normal((20, 16))])
    ev = (ev / np.linalg.norm(ev, axis=1, keepdims=True)).astype(np.float32)
    write_embedding_shards(tmp_path / "eval", ev, ev, [f"eval {i}" for i in range(60)])
    r = runner.invoke(app, ["dedup", str(tmp_path / "eval"), "--memory", mem, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    sims = ev @ img.T
    expected = int((sims >= 0.95).any(axis=0).sum())
    assert res["near_duplicates"] == expected >= 40 and res["removed"] == 0 and res["memory_count"] == 600
    r = runner.invoke(app, ["dedup", str(tmp_path / "eval"), "--memory", mem, "--json"])
    assert json.loads(r.output)["removed"] == expected
    with Memory.open(mem) as m:
        assert m.count() == 600 - expected
        left = m.search(ev, "image", 1, "image", exact=True)
        assert (left.scores[:, 0] < 0.95).all()


def test_dedup_widens_search_past_many_duplicates(tmp_path):
    from reco_qdrant import Memory

    img, txt, caps = random_pairs_for_dedup()
    with Memory.open(":memory:") as m:
        m.add_embeddings(img, txt, caps, ids=range(len(caps)))
        ids = m.near_duplicates(img[:1], threshold=0.95)
        assert len(ids) == 50  # 50 copies of one image: more than the first search's k
        import pytest

        with pytest.raises(ValueError, match="threshold"):
            m.near_duplicates(img[:1], threshold=1.5)


def random_pairs_for_dedup():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(16)
    img = np.concatenate([base + 0.001 * rng.standard_normal((50, 16)), rng.standard_normal((100, 16))])
    img = (img / np.linalg.norm(img, axis=1, keepdims=True)).astype(np.float32)
    return img, img.copy(), [f"c{i}" for i in range(150)]


def test_shell_completion_lists_the_workflow():
    import os
    import subprocess
    import sys
    from pathlib import Path

    reco = Path(sys.executable).parent / "reco"  # the console script `pip install` made
    assert reco.exists(), "install the package (pip install -e .) so that `reco` exists"

    def complete(words: str, cword: int) -> set[str]:
        env = {**os.environ, "_RECO_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        return set(subprocess.run([str(reco)], env=env, capture_output=True, text=True, timeout=120).stdout.split())

    assert {"migrate", "ingest", "dedup", "train", "predict", "eval", "copy", "demo"} <= complete("reco ", 1)
    assert {"embeddings", "images", "webdataset"} <= complete("reco ingest ", 2)
    script = subprocess.run([str(reco), "--show-completion", "bash"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SHELL": "/bin/bash"})
    assert "_RECO_COMPLETE=complete_bash" in script.stdout
    r = runner.invoke(app, ["--help"])
    for step in ("migrate", "ingest", "dedup", "train", "predict", "eval", "copy", "info", "search"):
        assert step in r.output


def test_ingest_auto_finds_either_layout_and_says_what_it_expected(tmp_path, tiny_encoder):
    from test_ingest import _png

    mem = str(tmp_path / "m")
    make_shards(tmp_path / "emb", n=50)
    r = runner.invoke(app, ["ingest", "auto", str(tmp_path / "emb"), "--memory", mem, "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["added"] == 50

    images = tmp_path / "imgs"
    images.mkdir()
    for name, c in {"red": (220, 20, 20), "blue": (20, 20, 220)}.items():
        _png(c).save(images / f"{name}.png")
    (images / "captions.csv").write_text("file,caption\nred.png,a red square\nblue.png,a blue square\n")
    mem2 = str(tmp_path / "m2")
    args = ["ingest", "auto", str(images), "--memory", mem2, "--model", "reco-tiny", "--pretrained", "none",
            "--source", "squares", "--no-progress", "--json"]
    assert json.loads(runner.invoke(app, args).stdout)["added"] == 2
    assert json.loads(runner.invoke(app, args).stdout)["added"] == 0  # same source and keys: nothing new

    (images / "captions.jsonl").write_text('{"file": "red.png", "caption": "red"}\n')
    r = runner.invoke(app, args)
    assert r.exit_code != 0 and "several captions tables" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["ingest", "auto", str(empty), "--memory", mem2])
    assert r.exit_code != 0 and "neither layout found" in r.output and "img_emb/" in r.output


def test_train_from_the_memorys_own_pairs_without_labels(tmp_path):
    """`reco train` with no PAIRS: a sample of the memory's pairs, unlabelled, each excluded from its own
    neighbours; the checkpoint it writes is a real fusion model that `reco predict` can load."""
    from reco_qdrant import FusionModel, Memory

    make_shards(tmp_path / "laion", n=400, d=16)
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", mem, "--encoder-id", "enc",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--memory", mem, "--out", str(tmp_path / "run"), "--sample", "300",
                            "--epochs", "2", "--k", "5", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert "training on 300 of the memory's 400 pairs" in r.output
    res = json.loads(r.output[r.output.index("{"):])
    model = FusionModel.from_pretrained(res["checkpoint"])
    assert model.cfg.k == 5 and model.cfg.encoder_id == "enc" and model.adapted is None
    with Memory.open(mem) as m:
        ids, img, txt = m.sample_pairs(300, seed=0, progress=False)
        again = m.sample_pairs(300, seed=0, progress=False)
        other = m.sample_pairs(300, seed=1, progress=False)
        assert ids == again[0] and len(set(ids)) == 300 and ids != other[0]
        assert m.existing_ids(ids) == set(ids)
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
        assert m.sample_pairs(10_000, progress=False)[1].shape == (400, 16)  # all of them, not more
    r = runner.invoke(app, ["train", "--memory", mem, "--out", str(tmp_path / "run2"), "--adapt"])
    assert r.exit_code == 1 and "--label-column" in r.output


def test_train_adapt_fits_weights_to_the_labelled_classes_prompts(tmp_path, tiny_encoder):
    """`reco train PAIRS --label-column L --adapt`: the label names, embedded with the templates by the memory's
    own encoder (resolved before the embedded memory is opened for training), give the adapted weights."""
    from conftest import random_pairs

    from reco_qdrant import FusionModel, Memory, RecoClassifier
    from reco_qdrant.sources import write_embedding_shards

    d = tiny_encoder.dim
    img, txt, caps = random_pairs(240, d, seed=1)
    names = [f"species {i}" for i in range(6)]
    write_embedding_shards(tmp_path / "pairs", img, txt, caps, extra={"label": [names[i % 6] for i in range(240)]})
    mem = str(tmp_path / "m")
    with Memory.open(mem) as m:
        m.add_embeddings(img, txt, caps, encoder_id=tiny_encoder.id, encoder_spec=tiny_encoder.spec)
    args = ["train", str(tmp_path / "pairs"), "--memory", mem, "--out", str(tmp_path / "run"), "--label-column",
            "label", "--adapt", "--templates", "a photo of a {}.", "--epochs", "1", "--k", "5", "--no-progress",
            "--json", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    model = FusionModel.from_pretrained(tmp_path / "run" / "best")
    assert model.adapted is not None and model.cfg.adapted_classes == 6
    prompts = tiny_encoder.encode_texts([f"a photo of a {n}." for n in sorted(names)])
    assert model.adapted_to(prompts).all()
    with Memory.open(mem) as m:
        clf = RecoClassifier(m, model, weights="adapted").set_class_embeddings(prompts, sorted(names))
        assert clf.refiner_ is model.adapted and len(clf.predict_embeddings(img[:4])) == 4
    r = runner.invoke(app, ["predict", str(tmp_path / "x.png"), "--classes", "a,b", "--weights", "adapted",
                            "--memory", mem])
    assert r.exit_code == 1 and "give --fusion" in r.output
    r = runner.invoke(app, ["predict", str(tmp_path / "x.png"), "--classes", "a,b", "--gate", "coverage",
                            "--memory", mem])
    assert r.exit_code == 1 and "--gate coverage mixes RECO's scores with the encoder's: give --fusion" in " ".join(
        r.output.split()), r.output
    r = runner.invoke(app, ["predict", str(tmp_path / "x.png"), "--classes", "a,b", "--gate", "auto", "--memory", mem])
    assert r.exit_code == 1 and "--gate must be one of none, coverage, got 'auto'" in " ".join(r.output.split())


def test_read_only_commands_never_create_a_memory(tmp_path):
    """`reco info`, `reco doctor`, `reco search` and `reco predict --fusion` on a directory that does not exist: exit 1
    with the reason and what creates a memory, before any encoder is loaded; nothing is created."""
    nope = tmp_path / "nope"
    (tmp_path / "x.png").write_bytes(b"")
    predict = ["predict", str(tmp_path / "x.png"), "--classes", "a,b", "--fusion", str(tmp_path / "ckpt")]
    for args in (["info"], ["doctor"], ["search", "--text", "a bird"], predict):
        r = runner.invoke(app, [*args, "--memory", str(nope)])
        assert r.exit_code == 1, (args, r.output)
        assert "no such directory, so no memory there" in " ".join(r.output.split()), r.output
        assert not nope.exists(), args


def _commands(group, path=("reco",)):
    """(command path, command) for every command of the `reco` app, sub-commands of groups included."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer's own click types: no isinstance on click's)
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def test_every_option_and_argument_says_what_it_does():
    import typer

    command = typer.main.get_command(app)
    commands = dict(_commands(command))
    assert {"reco ingest images", "reco eval zero-shot", "reco train", "reco search"} <= set(commands)
    missing = [f"{where} {p.name}" for where, cmd in commands.items() for p in cmd.params
               if not (getattr(p, "help", None) or "").strip()]
    assert not missing, missing
    r = runner.invoke(app, ["ingest", "images", "--help"], env={"COLUMNS": "200"})
    flat = " ".join(r.output.split())
    assert "--source <str> source name stored with each pair" in flat
    assert "--restart --no-restart <bool> ignore the resume ledger" in flat


def test_train_never_creates_a_memory_or_a_collection(tmp_path):
    """`reco train` on a memory that does not exist, or a collection it does not hold (with or without PAIRS):
    exit 1 naming what is missing; no directory, no `typo` collection or ledger is created."""
    from conftest import random_pairs

    from reco_qdrant import Memory

    make_shards(tmp_path / "pairs", n=50, d=16)
    mem = tmp_path / "m"
    with Memory.open(str(mem)) as m:
        m.add_embeddings(*random_pairs(50, 16), source="s", encoder_id="enc")
    before = sorted(p.name for p in mem.iterdir())
    nope = tmp_path / "nope"
    common = ["--out", str(tmp_path / "run"), "--epochs", "1", "--k", "5", "--no-progress"]
    for pairs in ([], [str(tmp_path / "pairs")]):
        r = runner.invoke(app, ["train", *pairs, "--memory", str(nope), *common])
        assert r.exit_code == 1, (pairs, r.output)
        assert "no such directory, so no memory there" in " ".join(r.output.split()), r.output
        assert not nope.exists(), pairs
        r = runner.invoke(app, ["train", *pairs, "--memory", str(mem), "--collection", "typo", *common])
        assert r.exit_code == 1, (pairs, r.output)
        assert f"memory {mem} has no collection 'typo'; it holds reco_memory (50 points)" in " ".join(
            r.output.split()), r.output
        assert sorted(p.name for p in mem.iterdir()) == before, pairs
    assert not (tmp_path / "run").exists()


def test_hints_name_the_fix_and_keep_debug_for_the_unforeseen():
    import json as json_module

    from reco_qdrant.cli import _hint
    from reco_qdrant.sources import read_table

    try:
        json_module.loads("{")  # raised inside the standard library: not foreseen by us
    except ValueError as e:
        assert _hint(e) == "an unexpected error: run with --debug for the full traceback"
    try:
        read_table("nowhere.csv")  # raised by our own code, with a message that says what is wrong
    except FileNotFoundError as e:
        assert _hint(e) == "`reco --help` lists its options"  # outside any command: the program's


def test_the_help_hint_names_the_command_that_failed(tmp_path):
    """An error our code foresaw, with no hint of its own: the hint names the command's --help (`reco train`,
    `reco ingest embeddings`), not `reco --help`."""
    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    r = runner.invoke(app, ["train", "--memory", str(tmp_path / "m"), "--label-column", "x"])
    assert r.exit_code == 1, r.output
    assert "hint: `reco train --help` lists its options" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "emb"), "--memory", str(tmp_path / "m")])
    assert r.exit_code == 1, r.output
    flat = " ".join(r.output.split())
    assert "no img_emb/img_emb_*.npy files" in flat
    assert "hint: `reco ingest embeddings --help` lists its options" in flat


def test_a_damaged_collection_beside_the_one_asked_about_is_said_not_a_crash(tmp_path):
    """A sibling collection whose files the engine cannot read: `reco info` and `reco doctor` on the healthy one
    work and name it as unreadable (doctor: a warning with the check for it); so does a missing collection's
    error. No traceback."""
    from conftest import random_pairs

    from reco_qdrant import Memory
    from reco_qdrant.doctor import check_memory

    mem = tmp_path / "m"
    for name in ("reco_memory", "other"):
        with Memory.open(str(mem), collection=name) as m:
            m.add_embeddings(*random_pairs(40, 16), source="s", encoder_id="enc")
    segment = sorted((mem / "other" / "segments").glob("*/segment.json"))
    assert segment, "the engine's layout changed"
    segment[0].write_bytes(b"")  # the engine cannot load `other` now

    r = runner.invoke(app, ["info", "--memory", str(mem)])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "collection 'other' beside it cannot be read by the engine" in flat
    assert f"`reco doctor --memory {mem} --collection other` checks it" in flat
    assert "select one with --collection other" not in flat and "Traceback" not in r.output
    r = runner.invoke(app, ["doctor", "--memory", str(mem)])
    assert r.exit_code == 0, r.output  # a warning: the memory asked about is healthy
    flat = " ".join(r.output.split())
    assert "warning: collection 'other' beside it cannot be read by the engine" in flat, r.output
    assert "ok: other collections here" not in flat
    unreadable = [f for f in check_memory(str(mem)) if "'other'" in f.what]
    assert [f.level for f in unreadable] == ["warning"] and "--collection other" in unreadable[0].fix
    r = runner.invoke(app, ["doctor", "--memory", str(mem), "--collection", "typo"])
    flat = " ".join(r.output.split())
    assert ("the data here are in other (unreadable by the engine), reco_memory (40 points)" in flat
            and "select it with --collection reco_memory" in flat
            and "warning: collection 'other' beside it cannot be read" in flat), r.output
    r = runner.invoke(app, ["info", "--memory", str(mem), "--collection", "typo"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert ("has no collection 'typo'; it holds other (unreadable by the engine), reco_memory (40 points)"
            in " ".join(r.output.split())), r.output


def test_info_lists_sources_and_says_where_the_data_are(tmp_path):
    """`reco info` counts the memory's points per source; info and doctor name the collections that hold the data
    when the one asked about does not (the demo writes `reco_demo`)."""
    from reco_qdrant import Memory

    mem = str(tmp_path / "m")
    make_shards(tmp_path / "a", n=120)
    make_shards(tmp_path / "b", n=30, seed=1)
    for name in ("a", "b"):
        r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / name), "--memory", mem, "--source",
                                f"set-{name}", "--encoder-id", "enc", "--no-progress"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", "--memory", mem, "--json"])
    assert json.loads(r.stdout)["sources"] == {"set-a": 120, "set-b": 30}
    r = runner.invoke(app, ["info", "--memory", mem], env={"COLUMNS": "120"})
    assert "set-a: 120 points" in r.stdout and "set-b: 30 points" in r.stdout

    demo = str(tmp_path / "demo")
    with Memory.open(demo, collection="reco_demo") as m:
        img, txt, caps = make_shards(tmp_path / "c", n=50)
        m.add_embeddings(img, txt, caps, source="synthetic", encoder_id="synthetic-world")
    r = runner.invoke(app, ["doctor", "--memory", demo])
    assert r.exit_code == 0, r.output  # a warning, as before: nothing is wrong with the memory
    flat = " ".join(r.output.split())
    assert ("warning: memory " + demo + " has no collection 'reco_memory'; the data here are in reco_demo "
            "(50 points) fix: select it with --collection reco_demo") in flat
    assert not (tmp_path / "demo" / "reco_memory__meta").exists()  # looking created nothing
    r = runner.invoke(app, ["doctor", "--memory", demo, "--collection", "reco_demo", "--quick"])
    assert r.exit_code == 0 and "ok: opens:" in r.output and "other collections" not in r.output, r.output

    assert runner.invoke(app, ["migrate", "--memory", demo, "--dim", "16"]).exit_code == 0  # an empty default one
    r = runner.invoke(app, ["doctor", "--memory", demo, "--quick"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 0 and ("warning: collection 'reco_memory' is empty; the points here are in reco_demo "
                                 "(50 points) fix: select it with --collection reco_demo") in flat, r.output
    r = runner.invoke(app, ["info", "--memory", demo])
    assert r.exit_code == 0 and "note: other collections here: reco_demo (50 points); select one with --collection " \
        "reco_demo" in " ".join(r.stderr.split())


def test_sources_and_collections_on_both_backends(tmp_path):
    from conftest import open_memory, random_pairs

    for kind in ("edge", "local"):
        with open_memory(kind, tmp_path / kind) as m:
            assert m.sources() == {} and m.collections() == {"reco_memory": 0}
            img, txt, caps = random_pairs(40)
            m.add_embeddings(img[:25], txt[:25], caps[:25], source="web")
            m.add_embeddings(img[25:], txt[25:], caps[25:], source="/data/cub")
            assert m.sources() == {"web": 25, "/data/cub": 15}, kind  # largest first
            assert m.collections() == {"reco_memory": 40}, kind
    from reco_qdrant import Memory

    with Memory.open(str(tmp_path / "edge" / "mem"), collection="second") as m:
        m.add_embeddings(img[:5], txt[:5], caps[:5], source="x")
        assert m.collections() == {"reco_memory": 40, "second": 5}


def test_progress_bars_fit_80_columns(tmp_path):
    """Drawn as on an 80-column terminal (COLUMNS=80, colours forced): no line reaches the last column, with a long
    description (an ingest names its folder's full path) and large counts."""
    import os
    import re
    import subprocess
    import sys

    script = ("import time\nfrom reco_qdrant.progress import progress_bar\n"
              "with progress_bar('ingest /data/a/rather/long/folder/of/bird/photos/cub_200_2011/images', 1234567) "
              "as advance:\n    for _ in range(20):\n        advance(61728)\n        time.sleep(0.02)\n"
              "with progress_bar('neighbours (image queries)', None) as advance:\n    advance(10)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "80", "FORCE_COLOR": "1"})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", r.stderr)) if ln.strip()]
    assert any("1234560/1234567" in ln for ln in lines), lines
    assert any("ingest …" in ln and "cub_200_2011/images" in ln for ln in lines), lines  # its start and its end
    assert max(len(ln) for ln in lines) < 80, [ln for ln in lines if len(ln) >= 80]


def test_train_from_an_image_folder_leaves_the_pairs_in_the_memory_out_of_their_neighbours(tmp_path, monkeypatch):
    """`reco train FOLDER --captions TABLE`: the images are encoded with the memory's recorded encoder and cached;
    the pairs the memory holds are found by their keys (no --in-memory-source) and said in one line."""
    import shutil

    from test_newcomer import write_images

    from reco_qdrant import FusionModel

    monkeypatch.setenv("RECO_CACHE_DIR", str(tmp_path / "cache"))
    images = write_images(tmp_path)
    rows = (tmp_path / "captions.csv").read_text().splitlines()
    (tmp_path / "part.csv").write_text("\n".join([rows[0], *rows[-10:]]) + "\n")  # the last 10 pairs only
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["ingest", "images", str(images), "--captions", str(tmp_path / "part.csv"), "--memory",
                            mem, "--model", "reco-tiny", "--pretrained", "none", "--no-progress"])
    assert r.exit_code == 0, r.output
    train = ["train", str(images), "--captions", str(tmp_path / "captions.csv"), "--memory", mem, "--epochs", "1",
             "--k", "5", "--no-progress"]
    r = runner.invoke(app, [*train, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "encoder: open_clip/reco-tiny/random-seed0 (recorded with the memory)" in flat
    assert "24 training pairs from" in flat and "encoded with open_clip/reco-tiny/random-seed0, cached in" in flat
    assert (f"10 of the 24 training pairs are in the memory (source {images.resolve()}, found by their keys): each "
            "is left out of its own neighbours") in flat  # the first row is not one of them: it is moved
    assert FusionModel.from_pretrained(tmp_path / "run" / "best").cfg.encoder_id == "open_clip/reco-tiny/random-seed0"

    r = runner.invoke(app, [*train, "--out", str(tmp_path / "run2"), "--label-column", "label"])
    assert r.exit_code == 0, r.output
    assert "24 training pairs from" in r.output and "embeddings read from the cache" in " ".join(r.output.split())

    r = runner.invoke(app, [*train, "--out", str(tmp_path / "run3"), "--in-memory-source", "photos"])
    assert r.exit_code == 1
    assert (f"none of the training pairs is in the memory under source 'photos'; its sources: {images.resolve()}"
            in " ".join(r.output.split()))
    r = runner.invoke(app, [*train, "--out", str(tmp_path / "run3"), "--label-column", "species"])
    assert r.exit_code == 1 and "no column 'species'" in r.output and "--label-column" in r.output

    elsewhere = tmp_path / "copy"
    shutil.copytree(images, elsewhere)  # the same photos in another folder: the same pairs, found by their vectors
    shutil.copy(tmp_path / "captions.csv", elsewhere)  # the folder's own table: no --captions needed
    r = runner.invoke(app, ["train", str(elsewhere), "--memory", mem, "--epochs", "1", "--k", "5", "--no-progress",
                            "--out", str(tmp_path / "run4")])
    assert r.exit_code == 0, r.output
    stored = re.escape(str(images.resolve()))
    assert re.search(rf"(?<![\d,])10 of the 24 training pairs are in the memory \(source {stored}, found by their "
                     r"keys\)", " ".join(r.output.split())), r.output


def test_train_does_not_take_other_pictures_with_the_same_names_for_stored_pairs(tmp_path, monkeypatch):
    """A folder whose files have the names of stored pairs but hold other pictures: its pairs are not in the memory
    (their keys are, with other image vectors), so none is left out of its neighbours as "itself"; the same for an
    embeddings folder whose keys are stored with other embeddings."""
    from PIL import Image
    from test_newcomer import write_images

    monkeypatch.setenv("RECO_CACHE_DIR", str(tmp_path / "cache"))
    images = write_images(tmp_path)
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["ingest", "images", str(images), "--captions", str(tmp_path / "captions.csv"), "--memory",
                            mem, "--model", "reco-tiny", "--pretrained", "none", "--no-progress"])
    assert r.exit_code == 0, r.output
    namesakes = tmp_path / "namesakes"
    namesakes.mkdir()
    rng = np.random.default_rng(5)
    for f in images.iterdir():  # the same file names, other pictures (noise: far from any coloured square)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(namesakes / f.name)
    train = ["train", str(namesakes), "--captions", str(tmp_path / "captions.csv"), "--memory", mem, "--epochs", "1",
             "--k", "5", "--no-progress"]
    r = runner.invoke(app, [*train, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert re.search(r"(?<![\d,])0 of the 24 training pairs are in the memory: none to leave out of their own "
                     rf"neighbours \(24 of their keys are stored under source {re.escape(str(images.resolve()))}, "
                     r"with other images: other pairs\)", flat), r.output
    r = runner.invoke(app, [*train, "--out", str(tmp_path / "run2"), "--in-memory-source", str(images.resolve())])
    assert r.exit_code == 1
    assert (f"none of the training pairs is in the memory under source '{images.resolve()}' (24 of their keys are "
            "there, with other images: other pairs)") in " ".join(r.output.split())

    make_shards(tmp_path / "laion", n=300, d=16)
    make_shards(tmp_path / "other" / "laion", n=300, d=16, seed=1)  # the same keys, other embeddings
    r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", str(tmp_path / "m2"),
                            "--source", "laion", "--encoder-id", "enc", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(tmp_path / "other" / "laion"), "--memory", str(tmp_path / "m2"), "--out",
                            str(tmp_path / "run3"), "--epochs", "1", "--k", "5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert re.search(r"(?<![\d,])0 of the 300 training pairs are in the memory: none to leave out", " ".join(
        r.output.split())), r.output


def test_train_finds_the_source_of_embedding_pairs_in_the_memory(tmp_path):
    """PAIRS in the clip-retrieval layout, ingested under a source name of their own: no --in-memory-source
    needed any more; the source is found by the pairs' keys."""
    make_shards(tmp_path / "laion", n=300, d=16)
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", mem, "--source", "laion",
                            "--encoder-id", "enc", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(tmp_path / "laion"), "--memory", mem, "--out", str(tmp_path / "run"),
                            "--epochs", "1", "--k", "5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert ("300 of the 300 training pairs are in the memory (source laion, found by their keys): each is left out "
            "of its own neighbours") in " ".join(r.output.split())
    r = runner.invoke(app, ["train", str(tmp_path / "laion"), "--memory", mem, "--out", str(tmp_path / "run"),
                            "--epochs", "1", "--k", "5", "--no-progress", "--in-memory-source", "laion"])
    assert r.exit_code == 0 and "(source laion):" in " ".join(r.output.split()), r.output


def test_train_leaves_out_a_few_stored_pairs_among_many_new_ones(tmp_path):
    """1,500 training pairs of which 3 are in the memory, at rows train_fusion's id check does not sample: they are
    still found, said, and left out (a stored pair is moved first, where that check looks)."""
    from conftest import random_pairs

    from reco_qdrant import Memory
    from reco_qdrant.sources import write_embedding_shards

    img, txt, caps = random_pairs(1500, 16, seed=2)
    keys = [f"k{i}" for i in range(1500)]
    write_embedding_shards(tmp_path / "pairs", img, txt, caps, extra={"key": keys})
    sampled = set(np.unique(np.linspace(0, 1499, 1000).astype(int)))
    stored = [i for i in range(1500) if i not in sampled][:3]
    other = random_pairs(50, 16, seed=3)
    with Memory.open(str(tmp_path / "m")) as m:
        m.add_embeddings(img[stored], txt[stored], [caps[i] for i in stored], ids=[keys[i] for i in stored],
                         source="few", encoder_id="enc")
        m.add_embeddings(*other, source="others", encoder_id="enc")
    r = runner.invoke(app, ["train", str(tmp_path / "pairs"), "--key-column", "key", "--memory", str(tmp_path / "m"),
                            "--out", str(tmp_path / "run"), "--epochs", "1", "--k", "5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "3 of the 1,500 training pairs are in the memory (source few, found by their keys)" in " ".join(
        r.output.split())


def test_train_leaves_out_only_the_pairs_stored_with_their_own_image(tmp_path, monkeypatch):
    """A key stored with another image is another pair (a folder of the same file names): its point must not be
    left out of the training pair's neighbours; only pairs found by key *and* image are."""
    from conftest import random_pairs

    import reco_qdrant.training as training
    from reco_qdrant import Memory
    from reco_qdrant.memory import point_id
    from reco_qdrant.sources import write_embedding_shards

    img, txt, caps = random_pairs(300, 16, seed=2)
    keys = [f"k{i}" for i in range(300)]
    write_embedding_shards(tmp_path / "pairs", img, txt, caps, extra={"key": keys})
    other_img, other_txt, other_caps = random_pairs(5, 16, seed=7)
    with Memory.open(str(tmp_path / "m")) as m:
        m.add_embeddings(img[:5], txt[:5], caps[:5], ids=keys[:5], source="few", encoder_id="enc")  # the same pairs
        m.add_embeddings(other_img, other_txt, other_caps, ids=keys[5:10], source="few",
                         encoder_id="enc")  # same keys, other images: other pairs

    class Captured(Exception):
        pass

    got = {}

    def train_fusion(*a, **kw):
        got["ids"] = kw["ids"]
        raise Captured

    monkeypatch.setattr(training, "train_fusion", train_fusion)
    r = runner.invoke(app, ["train", str(tmp_path / "pairs"), "--key-column", "key", "--memory", str(tmp_path / "m"),
                            "--out", str(tmp_path / "run"), "--epochs", "1", "--k", "5", "--no-progress",
                            "--in-memory-source", "few"])
    assert isinstance(r.exception, Captured), r.output
    assert "5 of the 300 training pairs are in the memory (source few)" in " ".join(r.output.split()), r.output
    ids = got["ids"]
    assert len(ids) == 300
    assert ids[:5] == [point_id("few", k) for k in keys[:5]]
    with Memory.open(str(tmp_path / "m")) as m:  # k5..k9 are stored, but with other images: not these pairs' points
        assert not m.existing_ids(ids[5:]) and not set(ids[5:]) & {point_id("few", k) for k in keys}
        assert len(m.existing_ids(ids[:5])) == 5
