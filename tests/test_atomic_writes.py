"""Files that are replaced are written beside, fsynced and renamed: a failed write never leaves part of a file
under its final name (the neighbour cache's mask, `reco train`'s OUT/best)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

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


def test_neighbour_cache_removes_its_temporary_files_when_interrupted(tmp_path, monkeypatch):
    """A failure or Ctrl-C while the neighbours are searched leaves none of the run's temporary files behind."""
    import reco_qdrant.neighbour_cache as T

    img, txt, caps = random_pairs(200)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps)
        cfg = TrainConfig(k=5, cache_dir=str(tmp_path / "cache"), progress=False)
        for exc in (KeyboardInterrupt, OSError):
            def interrupted(*a, exc=exc, **kw):
                raise exc("interrupted")
            monkeypatch.setattr(T, "retrieve", interrupted)
            with pytest.raises(exc):
                neighbour_cache(mem, img[:50], "image", cfg, None, columns=False)
            root = tmp_path / "cache" / "neighbours"
            assert not list(root.glob("*.tmp.npy")), list(root.iterdir())
        monkeypatch.undo()
        _, _, mask = neighbour_cache(mem, img[:50], "image", cfg, None, columns=False)
        assert mask.all()


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


def test_fsync_path_syncs_every_directory_of_a_tree(tmp_path, monkeypatch):
    """A directory published by rename is durable only if the entry lists of its subdirectories are too."""
    from reco_qdrant import durable

    tree = tmp_path / "t"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "c").mkdir()
    (tree / "a" / "b" / "f.bin").write_bytes(b"x")
    (tree / "top.bin").write_bytes(b"y")
    opened, real_open = [], durable.os.open
    monkeypatch.setattr(durable.os, "open", lambda p, *a, **kw: opened.append(Path(p)) or real_open(p, *a, **kw))
    durable.fsync_path(tree)
    assert set(opened) == {tree, tree / "a", tree / "a" / "b", tree / "c", tree / "a" / "b" / "f.bin",
                           tree / "top.bin"}
    assert opened[-1] == tree and opened.index(tree / "a" / "b") < opened.index(tree / "a")  # deepest first


def test_prune_cache_tolerates_a_concurrent_prune(tmp_path, monkeypatch):
    """Another process pruning the same folder between the listing and the stat is not an error."""
    from reco_qdrant.neighbour_cache import _prune_cache

    for i, key in enumerate(("a", "b", "gone", "c")):
        for part in ("vectors", "keys", "mask"):
            np.save(tmp_path / f"{key}.{part}.npy", np.zeros(1))
        os.utime(tmp_path / f"{key}.vectors.npy", (1000 + i, 1000 + i))
    real_stat = Path.stat

    def stat(self, *a, **kw):
        if self.name.startswith("gone."):  # listed, then unlinked by the other process before this stat
            for p in tmp_path.glob("gone.*"):
                p.unlink(missing_ok=True)
        return real_stat(self, *a, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    _prune_cache(tmp_path, 1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.keys.npy", "c.mask.npy", "c.vectors.npy"]


def test_neighbour_cache_survives_a_concurrent_prune_of_what_it_wrote(tmp_path, monkeypatch):
    """The cache just written may be pruned by another process before it is returned: the arrays returned are
    the ones computed, not a reload of files that may be gone."""
    import reco_qdrant.neighbour_cache as cache

    img, txt, caps = random_pairs(120)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(img, txt, caps)
        want = [np.array(a) for a in neighbour_cache(mem, img[:20], "image", TrainConfig(
            k=4, cache_dir=str(tmp_path / "ref"), progress=False), None, columns=False)]
        root = tmp_path / "cache" / "neighbours"
        real = cache._prune_cache

        def other_process_prunes_all(r, keep):
            real(r, keep)
            for p in root.glob("*.npy"):
                p.unlink()

        monkeypatch.setattr(cache, "_prune_cache", other_process_prunes_all)
        got = neighbour_cache(mem, img[:20], "image", TrainConfig(k=4, cache_dir=str(tmp_path / "cache"),
                                                                   progress=False), None, columns=False)
        assert not list(root.glob("*.npy"))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), b)
