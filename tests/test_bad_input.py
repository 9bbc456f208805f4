"""The bad-input matrix, one test each, through the `reco` command: exit code 1, one error line that
names the file/row and what was expected, and the memory left as it was."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image
from test_ingest import image_bytes, make_shards, write_tar
from typer.testing import CliRunner

from reco_qdrant import Memory
from reco_qdrant.cli import app
from reco_qdrant.sources import write_embedding_shards

runner = CliRunner()
TINY = ["--model", "reco-tiny", "--pretrained", "none"]


@pytest.fixture
def stored(tmp_path):
    """A memory holding 100 pairs of 16-d vectors from encoder 'enc'."""
    make_shards(tmp_path / "good", n=100, shard_size=100)
    mem = str(tmp_path / "m")
    r = runner.invoke(app, ["ingest", "embeddings", str(tmp_path / "good"), "--memory", mem, "--encoder-id", "enc",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    return mem


def fails(args: list[str], *patterns: str, memory: str | None = None, count: int | None = 100) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "error:" in r.output and "hint:" in r.output, r.output
    flat = " ".join(r.output.split())
    assert "--debug" not in flat, r.output  # a foreseen error: its hint names the fix, not the traceback
    for p in patterns:
        assert p in flat, (p, r.output)
    if memory is not None and count is not None:
        with Memory.open(memory) as m:
            assert m.count() == count  # what was stored is intact


def shards(root, img, txt=None, caps=None):
    n = len(img)
    write_embedding_shards(root, img, img if txt is None else txt, caps or [f"c {i}" for i in range(n)])
    return str(root)


def ingest_args(src, mem):
    return ["ingest", "embeddings", src, "--memory", mem, "--no-progress", "--restart"]


def test_truncated_npy(stored, tmp_path):
    make_shards(tmp_path / "t", n=10, shard_size=10, seed=1)
    f = tmp_path / "t" / "img_emb" / "img_emb_0.npy"
    f.write_bytes(f.read_bytes()[:100])
    fails(ingest_args(str(tmp_path / "t"), stored), "img_emb_0.npy", "not a readable .npy", memory=stored)


def test_row_count_mismatch(stored, tmp_path):
    make_shards(tmp_path / "t", n=10, shard_size=10, seed=1)
    meta = tmp_path / "t" / "metadata" / "metadata_0.parquet"
    pl.read_parquet(meta).head(7).write_parquet(meta)
    fails(ingest_args(str(tmp_path / "t"), stored), "row counts differ", "metadata_0.parquet 7", memory=stored)


def test_missing_caption_column(stored, tmp_path):
    make_shards(tmp_path / "t", n=10, shard_size=10, seed=1)
    fails(ingest_args(str(tmp_path / "t"), stored) + ["--caption-column", "text"], "no column 'text'",
          "name the table's caption column with --caption-column", memory=stored)


def test_dimension_mismatch(stored, tmp_path):
    make_shards(tmp_path / "t", n=5, d=32)
    fails(ingest_args(str(tmp_path / "t"), stored), "dimension 32, expected 16", memory=stored)


@pytest.mark.parametrize("value, what", [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (0.0, "zero vector")])
def test_nan_inf_and_zero_vectors(stored, tmp_path, value, what):
    img = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    img[4] = value
    row = "row 4 holds" if value != 0 else "row 4 is a"
    fails(ingest_args(shards(tmp_path / "t", img), stored), "img_emb_0.npy", row, what, memory=stored)


def test_empty_caption(stored, tmp_path):
    img = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    fails(ingest_args(shards(tmp_path / "t", img, caps=["a", "b", "  ", "d"]), stored), "row 2",
          "empty or non-text caption", memory=stored)


def _folder(tmp_path, files: dict[str, bytes], captions: bytes | None = None):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "ok.png").write_bytes(image_bytes((10, 200, 30)))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    table = tmp_path / "captions.csv"
    table.write_bytes(captions or ("file,caption\nok.png,fine\n" + "".join(f"{n},broken\n" for n in files)).encode())
    return ["ingest", "images", str(folder), "--captions", str(table), "--memory", str(tmp_path / "img-mem"),
            "--batch-size", "1", "--no-progress", *TINY]


def test_missing_file_column(tmp_path):
    args = _folder(tmp_path, {}, captions=b"path,caption\nok.png,fine\n")
    fails(args, "captions.csv: no column 'file'", "--file-column (its columns: path, caption)")
    assert not (tmp_path / "img-mem").exists()  # refused before any memory was made


def test_image_in_the_table_but_not_in_the_folder(tmp_path):
    args = _folder(tmp_path, {}, captions=b"file,caption\nok.png,fine\ngone.png,lost\n")
    fails(args, "row 1: image", "gone.png not found", "relative to FOLDER", memory=str(tmp_path / "img-mem"),
          count=1)


def test_checkpoint_file_that_does_not_exist(tmp_path):
    args = _folder(tmp_path, {})[:-len(TINY)]
    fails(args + ["--model", "reco-tiny", "--pretrained", str(tmp_path / "ckpt" / "model.bin")],
          "model.bin: no such checkpoint file", "--pretrained takes an open_clip tag")


def test_unknown_pretrained_tag(tmp_path):
    args = _folder(tmp_path, {})[:-len(TINY)]
    fails(args + ["--pretrained", "laion2b_nope"], "no pretrained weights 'laion2b_nope' for ViT-B-32",
          "its tags are", "laion2b_s34b_b79k", "--pretrained takes an open_clip tag")


def test_collection_that_does_not_exist(tmp_path):
    mem = str(tmp_path / "m")
    with Memory.open(mem, collection="reco_demo") as m:
        m.add_embeddings(*_pairs(40), source="synthetic")
    for args in (["search", "--text", "a bird", *TINY], ["info"]):
        fails([*args, "--memory", mem], "has no collection 'reco_memory'; it holds reco_demo (40 points)",
              "select one with --collection reco_demo")
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if not p.name.startswith(".")) == [
        "reco_demo", "reco_demo__meta", "reco_demo__vectors"]  # nothing created for the missing one


def _pairs(n: int) -> tuple:
    img = np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)
    return img, img, [f"c {i}" for i in range(n)]


def test_corrupt_or_truncated_image(tmp_path):
    fails(_folder(tmp_path, {"cut.png": image_bytes()[:40]}), "cut.png", "not a readable image",
          memory=str(tmp_path / "img-mem"), count=1)  # the good image before it stays


def test_non_image_file(tmp_path):
    fails(_folder(tmp_path, {"notes.png": b"just text"}), "notes.png", "not a readable image",
          memory=str(tmp_path / "img-mem"), count=1)


def test_non_utf8_captions_table(tmp_path):
    fails(_folder(tmp_path, {}, captions=b"file,caption\nok.png,caf\xe9\n"), "captions.csv", "cannot read table")


def test_non_utf8_webdataset_text(tmp_path):
    tar_path = write_tar(tmp_path / "bad.tar", {"a.png": image_bytes(), "a.txt": b"\xff\xfe caption"})
    fails(["ingest", "webdataset", str(tar_path), "--memory", str(tmp_path / "w"), "--no-progress", *TINY],
          "bad.tar", "a.txt is not UTF-8")


def test_empty_memory_at_search(tmp_path):
    fails(["search", "--text", "a bird", "--memory", str(tmp_path / "empty"), *TINY], "no such directory", "ingest")


def test_missing_memory_at_train(tmp_path):
    make_shards(tmp_path / "pairs", n=50, d=16)
    fails(["train", str(tmp_path / "pairs"), "--out", str(tmp_path / "run"), "--memory", str(tmp_path / "empty"),
           "--no-progress"], "no such directory", "reco ingest")
    assert not (tmp_path / "empty").exists()  # training never creates a memory


def test_k_larger_than_memory(stored, tmp_path):
    make_shards(tmp_path / "pairs", n=50, d=16)
    fails(["train", str(tmp_path / "pairs"), "--out", str(tmp_path / "run"), "--memory", stored, "--k", "500",
           "--no-progress"], "holds 100 points, fewer than k=500", memory=stored)


def test_unknown_template_placeholder(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    fails(["predict", str(tmp_path / "x.png"), "--classes", "a,b", "--templates", "a photo of a {species}.", *TINY],
          "exactly one '{}' placeholder", "{species}")
    fails(["predict", str(tmp_path / "x.png"), "--classes", "a,b", "--templates", "birdz", *TINY],
          "unknown template set 'birdz'")


def test_memory_of_another_encoder(stored, tmp_path):
    fails(["search", "--text", "a bird", "--memory", stored, "--k", "3", *TINY], "holds 16-d vectors from 'enc'",
          "got 64-d from 'open_clip/reco-tiny/random-seed0'", memory=stored)
    make_shards(tmp_path / "same-dim", n=30, d=64)  # same dimension, another encoder
    mem = str(tmp_path / "m64")
    runner.invoke(app, ingest_args(str(tmp_path / "same-dim"), mem) + ["--encoder-id", "enc"])
    fails(["search", "--text", "a bird", "--memory", mem, "--k", "3", *TINY], "was built with encoder 'enc'",
          "not 'open_clip/reco-tiny/random-seed0'", memory=mem, count=30)


def test_checkpoint_for_another_dim_or_mode(stored, tmp_path):
    from reco_qdrant.fusion import FusionConfig, FusionModel

    FusionModel(FusionConfig(dim=64, n_heads=8)).save_pretrained(tmp_path / "ckpt")
    make_shards(tmp_path / "pairs", n=20, d=16)
    fails(["eval", "retrieval", str(tmp_path / "pairs"), "--fusion", str(tmp_path / "ckpt"), "--memory", stored],
          "fusion model is 64-d, memory holds 16-d", memory=stored)
    cfg = tmp_path / "ckpt" / "config.json"
    cfg.write_text(cfg.read_text().replace('"search": "uni"', '"search": "sideways"'))
    fails(["eval", "retrieval", str(tmp_path / "pairs"), "--fusion", str(tmp_path / "ckpt"), "--memory", stored],
          "search must be one of", memory=stored)


def test_memory_locked_by_another_process(stored, tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom reco_qdrant import Memory\n"
                               f"m = Memory.open({stored!r})\nprint('open', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        make_shards(tmp_path / "more", n=10, d=16, seed=3)
        fails(ingest_args(str(tmp_path / "more"), stored), "is in use by another process",
              "close the other process")
    finally:
        holder.kill()
        holder.wait()
    with Memory.open(stored) as m:
        assert m.count() == 100


def test_training_ids_that_name_no_point_of_the_memory(tmp_path):
    from conftest import random_pairs

    from reco_qdrant import train_fusion
    from reco_qdrant.memory import point_id

    img, txt, caps = random_pairs(60)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps, ids=[str(i) for i in range(60)], source="web")
        wrong = [point_id("/old/path/web", str(i)) for i in range(60)]  # another source name than at ingest
        with pytest.raises(ValueError, match="none of 60 ids checked .* source name"):
            train_fusion(mem, img, txt, ids=wrong, epochs=1, progress=False)
