"""Commands (and RecoClassifier) use the encoder the memory records when none is named (issue 15):
no repeated --model flags, a named one that differs is refused with the recorded id."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from reco_qdrant import FusionModel, Memory, RecoClassifier
from reco_qdrant.cli import app
from reco_qdrant.encoders import encoder_from_record
from reco_qdrant.fusion import FusionConfig
from reco_qdrant.synthetic import write_image_world

runner = CliRunner()
TINY = ["--model", "reco-tiny", "--pretrained", "none"]


@pytest.fixture
def ingested(tmp_path):
    world = write_image_world(tmp_path / "world", per_class=3, eval_per_class=1, size=32)
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["ingest", "images", world.memory_dir, "--captions", world.captions, "--memory", mem,
                            "--no-progress", *TINY])
    assert r.exit_code == 0, r.output
    return world, mem


def test_search_without_model_uses_the_recorded_encoder(ingested):
    world, mem = ingested
    r = runner.invoke(app, ["search", "--text", "a photo of a azure tit", "--memory", mem, "--k", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert "encoder: open_clip/reco-tiny/random-seed0 (recorded with the memory)" in r.stderr
    assert len(json.loads(r.stdout)) == 3
    with Memory.open(mem) as m:
        assert m.encoder_record["load"] == {"kind": "open_clip", "name": "reco-tiny", "seed": 0, "pretrained": None}


def test_a_different_named_encoder_is_refused_with_the_recorded_id(ingested, tiny_encoder, tmp_path):
    from safetensors.torch import save_file

    world, mem = ingested
    ckpt = tmp_path / "other.safetensors"
    state = {k: (v + 0.01 if v.is_floating_point() else v).contiguous()
             for k, v in tiny_encoder.model.state_dict().items()}
    save_file(state, str(ckpt))
    r = runner.invoke(app, ["search", "--text", "a bird", "--memory", mem, "--model", "reco-tiny", "--pretrained",
                            str(ckpt)])
    assert r.exit_code == 1
    assert "was built with encoder 'open_clip/reco-tiny/random-seed0'" in " ".join(r.output.split())


def test_a_local_checkpoint_is_recorded_by_path_and_digest(tiny_encoder, tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}, str(ckpt))
    world = write_image_world(tmp_path / "world", per_class=2, eval_per_class=1, size=32)
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["ingest", "images", world.memory_dir, "--captions", world.captions, "--memory", mem,
                            "--no-progress", "--model", "reco-tiny", "--pretrained", str(ckpt)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "--text", "a bird", "--memory", mem, "--k", "2", "--json"])
    assert r.exit_code == 0 and "file-sha256:" in r.stderr, r.output
    ckpt.write_bytes(b"not the same weights")  # the file changed: refused rather than silently different
    r = runner.invoke(app, ["search", "--text", "a bird", "--memory", mem, "--k", "2"])
    assert r.exit_code == 1


def test_classifier_without_encoder_loads_the_recorded_one(ingested):
    world, mem = ingested
    with Memory.open(mem) as m:
        fusion = FusionModel(FusionConfig(dim=m.dim, k=4, n_heads=4))
        clf = RecoClassifier(m, fusion).set_classes(world.class_names, "birds")
        assert clf.encoder.id == "open_clip/reco-tiny/random-seed0"
        assert len(clf.predict([f"{world.eval_dir}/azure_tit/0.png"])) == 1


def test_memories_that_cannot_say_how_to_load_their_encoder_give_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="records encoder 'unspecified' but not how to load it"):
        encoder_from_record({"id": "unspecified", "dim": 16})
    from test_ingest import make_shards

    make_shards(tmp_path / "e", n=20, d=16)
    mem = str(tmp_path / "m")
    assert runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "e"), "--memory", mem,
                               "--no-progress"]).exit_code == 0
    r = runner.invoke(app, ["search", "--text", "a bird", "--memory", mem])
    assert r.exit_code == 1 and "pass --model/--pretrained" in " ".join(r.output.split()), r.output
