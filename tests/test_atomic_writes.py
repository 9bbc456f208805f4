"""Files that are replaced are written beside, fsynced and renamed: a failed write never leaves part of a file
under its final name (the neighbour cache's mask, `reco train`'s OUT/best)."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from conftest import random_pairs
from typer.testing import CliRunner

from reco_qdrant import FusionModel, Memory
from reco_qdrant.cli import app
from reco_qdrant.sources import write_embedding_shards
from reco_qdrant.training import TrainConfig, neighbour_cache


def _fail_midway(real, path_arg, when=lambda: True):
    """A writer that, when `when()`, writes the first half of what `real` would write to its argument
    `path_arg` and then fails as a full disk does (the file as a killed or out-of-space write leaves it)."""
    def write(*a, **kw):
        if not when():
            return real(*a, **kw)
        real(*a, **kw)
        path = a[path_arg]
        with open(path, "r+b") as f:
            f.truncate(max(1, f.seek(0, 2) // 2))
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return write


def test_neighbour_cache_mask_is_never_seen_partial(tmp_path, monkeypatch):
    img, txt, caps = random_pairs(200)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps)
        cfg = TrainConfig(k=5, cache_dir=str(tmp_path / "cache"), progress=False)
        want = neighbour_cache(mem, img[:50], "image", TrainConfig(k=5, cache_dir=str(tmp_path / "ref"),
                                                                    progress=False), None)[2].copy()
        monkeypatch.setattr(np, "save", _fail_midway(np.save, 0))
        with pytest.raises(OSError, match="No space"):
            neighbour_cache(mem, img[:50], "image", cfg, None, columns=False)
        root = tmp_path / "cache" / "neighbours"
        assert not list(root.glob("*.mask.npy"))  # no mask under its final name: the failed write stayed beside
        assert not list(root.glob("*mask*"))  # and what it left beside was removed
        monkeypatch.undo()
        _, _, mask = neighbour_cache(mem, img[:50], "image", cfg, None, columns=False)
        np.testing.assert_array_equal(mask, want)
        (path,) = root.glob("*.mask.npy")
        np.testing.assert_array_equal(np.load(path), want)


def test_train_cli_never_leaves_a_partial_best(tmp_path, monkeypatch):
    """`reco train` writes OUT/best after training did: a failure there leaves training's OUT/best whole."""
    import safetensors.torch

    import reco_qdrant.training as training

    img, txt, caps = random_pairs(400)
    write_embedding_shards(tmp_path / "laion", img, txt, caps)
    mem = str(tmp_path / "m")
    r = CliRunner().invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", mem, "--encoder-id",
                                 "enc", "--no-progress"])
    assert r.exit_code == 0, r.output
    trained = []
    real_train = training.train_fusion

    def train_fusion(*a, **kw):  # the real training; afterwards the disk fills
        model = real_train(*a, **kw)
        trained.append(FusionModel.from_pretrained(tmp_path / "run" / "best").state_dict())
        return model

    monkeypatch.setattr(training, "train_fusion", train_fusion)
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_midway(safetensors.torch.save_file, 1, lambda: trained))
    r = CliRunner().invoke(app, ["train", "--memory", mem, "--out", str(tmp_path / "run"), "--sample", "300",
                                 "--epochs", "1", "--k", "5", "--no-progress", "--json", "--device", "cpu"])
    assert r.exit_code != 0 and trained
    best = FusionModel.from_pretrained(tmp_path / "run" / "best")  # whole: loads, and holds training's weights
    for k, v in best.state_dict().items():
        assert (v == trained[0][k]).all(), k
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["k"] == 5
