"""Property-based fuzzing (hypothesis) of every reader and of `validate_embeddings`.

For any input: either a clean ingest (every row stored) or one clear error that names the file, and the
memory never holds a partial or corrupt pair (each point has both vectors, finite and unit-norm, and a
non-empty caption). Example counts are kept small so the suite stays fast; `HYPOTHESIS_PROFILE=long`
runs many more.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reco_qdrant import Memory
from reco_qdrant.ingest import ingest
from reco_qdrant.memory import EncoderMismatchError, RecoMemoryError, validate_embeddings
from reco_qdrant.sources import EmbeddingShards, ImageFolder, WebDataset, write_embedding_shards

settings.register_profile("suite", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

CLEAR_ERRORS = (ValueError, FileNotFoundError, EncoderMismatchError, RecoMemoryError)
D = 8


def assert_sound(mem: Memory) -> int:
    """Every stored point is a whole, clean pair; returns how many there are."""
    n = 0
    for recs in mem.scroll(512, with_vectors=True):
        for r in recs:
            for m in ("image", "text"):
                v = np.asarray(r.vectors[m], np.float32)
                assert v.shape == (mem.dim,) and np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-3, r.id
            assert isinstance(r.payload.get("caption"), str) and r.payload["caption"].strip(), r.id
        n += len(recs)
    return n


def run_ingest(source_factory, root: Path, expect_rows: int | None, encoder=None) -> None:
    """Ingest into a fresh embedded memory; a failure must be a clear error naming a file under `root`."""
    with tempfile.TemporaryDirectory() as mem_dir, Memory.open(mem_dir) as mem:
        try:
            ingest(mem, source_factory(), encoder, encoder_id=None if encoder else "fuzz", progress=False)
        except CLEAR_ERRORS as e:
            msg = str(e)
            assert msg and "Traceback" not in msg
            assert str(root) in msg or root.name in msg or "embeddings" in msg, msg
            assert_sound(mem)
            return
        stored = assert_sound(mem)
        if expect_rows is not None:
            assert stored == expect_rows


# --------------------------------------------------------------------------- validate_embeddings

float_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    elements=None,
)


@given(x=float_arrays, dim=st.one_of(st.none(), st.integers(1, 6)))
def test_validate_embeddings_returns_unit_rows_or_says_what_is_wrong(x, dim):
    try:
        out = validate_embeddings(x, "image embeddings", dim, "fuzz.npy")
    except (ValueError, EncoderMismatchError) as e:
        assert "fuzz.npy" in str(e)
        return
    assert out.dtype == np.float32 and out.ndim == 2 and (dim is None or out.shape[1] == dim)
    assert np.isfinite(out).all()
    if len(out):
        np.testing.assert_allclose(np.linalg.norm(out.astype(np.float64), axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- npy + parquet shards

values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.just(0.0))


@st.composite
def shard_sets(draw):
    n = draw(st.integers(0, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = rng.standard_normal((n, D)).astype(np.float32)
    txt = rng.standard_normal((n, D)).astype(np.float32)
    for a in (img, txt):  # a few cells replaced by anything (NaN, inf, 0, huge, tiny)
        for _ in range(draw(st.integers(0, 3)) if n else 0):
            a[draw(st.integers(0, n - 1)), draw(st.integers(0, D - 1))] = draw(values)
    caption = st.one_of(st.text(max_size=20), st.none(), st.integers(-1000, 1000))
    captions = draw(st.lists(caption, min_size=n, max_size=n))
    keys = draw(st.one_of(st.none(), st.lists(st.one_of(st.text(max_size=4), st.none()), min_size=n, max_size=n)))
    damage = draw(st.sampled_from(["none", "truncate img", "truncate meta", "drop text row", "int dtype",
                                   "wrong dim", "garble meta"]))
    return img, txt, captions, keys, damage, draw(st.integers(0, 10_000))


def write_shards(root: Path, img, txt, captions, keys, damage, cut) -> None:
    extra = {"key": keys} if keys is not None else None
    write_embedding_shards(root, img, txt, [""] * len(img), extra=extra)
    meta = root / "metadata" / "metadata_0.parquet"
    if len(img) == 0:
        return
    table = pl.read_parquet(meta).with_columns(pl.Series("caption", [str(c) if c is not None else None
                                                                     for c in captions] if captions else None,
                                                         dtype=pl.Utf8))
    if any(isinstance(c, int) for c in captions):
        table = table.with_columns(pl.Series("caption", [c if isinstance(c, int) else None for c in captions]))
    table.write_parquet(meta)
    f_img, f_txt = root / "img_emb" / "img_emb_0.npy", root / "text_emb" / "text_emb_0.npy"
    if damage == "truncate img":
        data = f_img.read_bytes()
        f_img.write_bytes(data[: cut % max(1, len(data))])
    elif damage == "truncate meta":
        data = meta.read_bytes()
        meta.write_bytes(data[: cut % max(1, len(data))])
    elif damage == "garble meta":
        data = bytearray(meta.read_bytes())
        for i in range(0, len(data), max(1, cut % 97 + 1)):
            data[i] ^= 0xFF
        meta.write_bytes(bytes(data))
    elif damage == "drop text row":
        np.save(f_txt, txt[:-1])
    elif damage == "int dtype":
        np.save(f_img, (img * 10).astype(np.int64) if np.isfinite(img).all() else np.zeros(img.shape, np.int64))
    elif damage == "wrong dim":
        np.save(f_txt, np.ones((len(txt), D + 1), np.float32))


@given(case=shard_sets())
def test_embedding_shards_ingest_cleanly_or_fail_clearly(case, tmp_path_factory):
    img, txt, captions, keys, damage, cut = case
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, img, txt, captions, keys, damage, cut)
    clean = (damage == "none" and np.isfinite(img).all() and np.isfinite(txt).all()
             and all(isinstance(c, str) and c.strip() for c in captions))
    run_ingest(lambda: EmbeddingShards(root, key_column="key" if keys is not None else None, source="fuzz"),
               root, len(img) if clean and keys is None else None)


# --------------------------------------------------------------------------- captions tables + image folders

def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


@given(rows=st.lists(st.tuples(st.sampled_from(["a.png", "b.png", "missing.png", "", "../a.png", "bad.png"]),
                               st.one_of(st.text(max_size=15), st.none())), max_size=6),
       fmt=st.sampled_from(["csv", "parquet", "jsonl", "raw bytes"]),
       junk=st.binary(max_size=64))
def test_image_folder_with_any_captions_table(rows, fmt, junk, tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("images")
    (root / "a.png").write_bytes(_png((200, 10, 10)))
    (root / "b.png").write_bytes(_png((10, 10, 200)))
    (root / "bad.png").write_bytes(junk)  # not an image (or, rarely, a broken one)
    table = root / f"captions.{'csv' if fmt == 'raw bytes' else fmt}"
    df = pl.DataFrame({"file": [r[0] for r in rows], "caption": [r[1] for r in rows]},
                      schema={"file": pl.Utf8, "caption": pl.Utf8})
    if fmt == "csv":
        df.write_csv(table)
    elif fmt == "parquet":
        df.write_parquet(table)
    elif fmt == "jsonl":
        df.write_ndjson(table)
    else:
        table.write_bytes(junk)
    try:
        source = ImageFolder(root, table, source="fuzz", batch_size=4)
    except CLEAR_ERRORS as e:
        assert str(table) in str(e) or table.name in str(e), str(e)
        return
    run_ingest(lambda: source, root, None, tiny_encoder)


# --------------------------------------------------------------------------- webdataset tar shards

@given(members=st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3", "dir/s1", ""]),
                                  st.sampled_from(["jpg", "png", "txt", "json", "cls", ""]),
                                  st.one_of(st.binary(max_size=40), st.just(b"PNG"), st.just(b'{"x": 1}'))),
                        max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 4000)))
def test_webdataset_shards_of_any_content(members, cut, tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("wds")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, ext, data in members:
            data = _png((10, 200, 10)) if data == b"PNG" else data
            info = tarfile.TarInfo(f"{name}.{ext}" if ext else name or "x")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    assume(raw)
    (root / "shard-000.tar").write_bytes(raw if cut is None else raw[:cut])
    run_ingest(lambda: WebDataset([root / "shard-000.tar"], source="fuzz"), root, None, tiny_encoder)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_validate_embeddings_extreme_but_finite_rows(scale):
    """Found by the fuzzer: float32 rows whose squared norm overflows (or underflows) float32."""
    x = np.full((2, 4), scale, np.float32)
    if scale < 1e-20:
        with pytest.raises(ValueError, match="zero vector"):
            validate_embeddings(x, "v", origin="here")
        return
    out = validate_embeddings(x, "v", origin="here")
    np.testing.assert_allclose(out, 0.5, atol=1e-6)
