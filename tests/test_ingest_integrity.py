"""Ingest never skips or overwrites silently: keys across shards, changed images, data before ledger."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest
from conftest import random_pairs
from PIL import Image

from reco_qdrant.ingest import ingest
from reco_qdrant.memory import Memory
from reco_qdrant.sources import EmbeddingShards, ImageFolder, write_embedding_shards


def shards_with_keys(root, keys_per_shard, d=16):
    """Shards whose metadata has a `key` column: one shard per list of keys."""
    n = sum(len(k) for k in keys_per_shard)
    img, txt, caps = random_pairs(n, d, seed=1)
    keys = [k for ks in keys_per_shard for k in ks]
    write_embedding_shards(root, img, txt, caps, shard_size=len(keys_per_shard[0]), extra={"key": keys})
    return img, txt, caps


def test_duplicate_keys_across_shards_are_refused_naming_both_files(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    shards_with_keys(tmp_path / "s", [keys, keys])  # two shards holding the same 10 keys
    with Memory.open(str(tmp_path / "m")) as mem:
        with pytest.raises(ValueError) as e:
            ingest(mem, EmbeddingShards(tmp_path / "s", key_column="key", batch_size=4), progress=False)
        msg = str(e.value)
        assert "metadata_0.parquet row 0" in msg and "metadata_1.parquet row 0" in msg and "'k0'" in msg
        assert "10 keys" in msg and "duplicates" in msg
        assert mem.count() == 0  # refused before anything was stored


def test_an_unreadable_shard_does_not_switch_off_the_duplicate_check(tmp_path):
    """Shards 0 and 1 share keys; shard 2's metadata is damaged. The check must not give up for all shards (the
    shared keys would overwrite silently): the damaged file is named and nothing is stored."""
    keys = [f"k{i}" for i in range(6)]
    shards_with_keys(tmp_path / "s", [keys, keys, [f"z{i}" for i in range(6)]])
    bad = tmp_path / "s" / "metadata" / "metadata_2.parquet"
    bad.write_bytes(b"PAR1 not a parquet file")
    with Memory.open(str(tmp_path / "m")) as mem:
        with pytest.raises(ValueError) as e:
            ingest(mem, EmbeddingShards(tmp_path / "s", key_column="key", batch_size=4), progress=False)
        assert mem.count() == 0  # not shards 0 and 1, the second overwriting the first
        msg = str(e.value)
        assert str(bad) in msg and "cannot read its key column 'key'" in msg and "duplicates" in msg, msg
    (tmp_path / "s" / "metadata" / "metadata_2.parquet").unlink()
    pl.DataFrame({"caption": [f"c{i}" for i in range(6)]}).write_parquet(bad)  # readable, no key column
    with Memory.open(str(tmp_path / "m2")) as mem:
        with pytest.raises(ValueError, match="metadata_2.parquet: no column 'key'"):
            ingest(mem, EmbeddingShards(tmp_path / "s", key_column="key", batch_size=4), progress=False)
        assert mem.count() == 0


def test_duplicate_keys_across_shards_last_wins_when_asked_and_reported(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    img, txt, _ = shards_with_keys(tmp_path / "s", [keys, keys[:4] + [f"new{i}" for i in range(6)]])
    with Memory.open(str(tmp_path / "m")) as mem:
        rep = ingest(mem, EmbeddingShards(tmp_path / "s", key_column="key", duplicates="last"), progress=False)
        assert rep.replaced_duplicates == 4 and mem.count() == 16
        rec = {r.payload["key"]: r for r in mem.retrieve([r.id for recs in mem.scroll() for r in recs])}
        np.testing.assert_allclose(rec["k0"].vectors["image"], img[10], atol=1e-6)  # the second shard's row
        np.testing.assert_allclose(rec["k5"].vectors["image"], img[5], atol=1e-6)


def test_duplicate_keys_across_shards_refused_on_the_cli(tmp_path):
    from typer.testing import CliRunner

    from reco_qdrant.cli import app

    keys = [f"k{i}" for i in range(5)]
    shards_with_keys(tmp_path / "s", [keys, keys])
    args = ["ingest", "embeddings", str(tmp_path / "s"), "--memory", str(tmp_path / "m"), "--key-column", "key",
            "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0 and "metadata_1.parquet row 0" in r.output
    r = CliRunner().invoke(app, [*args, "--duplicates", "last"])
    assert r.exit_code == 0, r.output
    assert "5 rows replaced by a later shard's row" in " ".join(r.output.split())
    with Memory.open(str(tmp_path / "m")) as mem:
        assert mem.count() == 5


def _image_folder(folder, colours, table=True):
    folder.mkdir(exist_ok=True)
    for i, c in enumerate(colours):
        Image.new("RGB", (32, 32), c).save(folder / f"im{i}.png")
    if table:
        pl.DataFrame({"file": [f"im{i}.png" for i in range(len(colours))],
                      "caption": [f"picture {i}" for i in range(len(colours))]}).write_csv(folder.parent / "caps.csv")


def test_changed_images_are_ingested_again_not_skipped(tmp_path, tiny_encoder):
    folder = tmp_path / "imgs"
    _image_folder(folder, [(200, 10, 10), (10, 200, 10), (10, 10, 200)])
    with Memory.open(str(tmp_path / "m"), encoder=tiny_encoder) as mem:
        ingest(mem, ImageFolder(folder, tmp_path / "caps.csv", batch_size=2), tiny_encoder, progress=False)
        before = {r.payload["key"]: np.asarray(r.vectors["image"]) for recs in mem.scroll() for r in recs}
        st = os.stat(folder / "im0.png")
        _image_folder(folder, [(250, 250, 250), (0, 0, 0), (128, 128, 0)], table=False)  # same names and table
        os.utime(folder / "im0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        rep = ingest(mem, ImageFolder(folder, tmp_path / "caps.csv", batch_size=2), tiny_encoder, progress=False)
        assert rep.skipped_batches == 0 and rep.updated == 3
        after = {r.payload["key"]: np.asarray(r.vectors["image"]) for recs in mem.scroll() for r in recs}
        want = tiny_encoder.encode_images([folder / f"im{i}.png" for i in range(3)])
        for i in range(3):
            assert not np.allclose(before[f"im{i}.png"], after[f"im{i}.png"])
            np.testing.assert_allclose(after[f"im{i}.png"], want[i], atol=1e-5)
        rep = ingest(mem, ImageFolder(folder, tmp_path / "caps.csv", batch_size=2), tiny_encoder, progress=False)
        assert rep.skipped_batches == 2  # unchanged files: still resumable


def test_data_is_flushed_before_the_ledger_records_a_batch(tmp_path, monkeypatch):
    """Order of the real engine calls: every ledger line of an ingest follows a flush of the batch it records
    (the flush and ledger write still run; this only records when). Power cuts themselves are not tested."""
    make = random_pairs(300)
    write_embedding_shards(tmp_path / "s", *make, shard_size=300)
    with Memory.open(str(tmp_path / "m")) as mem:
        calls: list[str] = []
        backend = mem.backend
        real_flush, real_set, real_upsert = backend.flush, backend.meta_set, backend.upsert

        def flush():
            calls.append("flush")
            real_flush()

        def meta_set(key, value):
            calls.append("ledger" if key.startswith("state:ingest:") else "meta")
            real_set(key, value)

        def upsert(*a, **kw):
            calls.append("upsert")
            real_upsert(*a, **kw)

        monkeypatch.setattr(backend, "flush", flush)
        monkeypatch.setattr(backend, "meta_set", meta_set)
        monkeypatch.setattr(backend, "upsert", upsert)
        ingest(mem, EmbeddingShards(tmp_path / "s", batch_size=100), progress=False, optimize=False)
        assert calls.count("ledger") == 3
        for i, c in enumerate(calls):
            if c == "ledger":
                last_upsert = max(j for j in range(i) if calls[j] == "upsert")
                assert "flush" in calls[last_upsert:i], calls
