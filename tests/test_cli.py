"""The `reco` command, in-process with typer's CliRunner, on real memories and files."""

from __future__ import annotations

import json

import numpy as np
from test_ingest import make_shards
from typer.testing import CliRunner

from reco_qdrant.cli import app

runner = CliRunner()


def test_migrate_ingest_info_search(tmp_path):
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["migrate", "--memory", mem, "--dim", "16", "--encoder-id", "enc", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["applied"] == ["0001_create_memory", "0002_index_source"]
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
