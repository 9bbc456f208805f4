"""Ingest from real files: precomputed shards, image folders, webdataset tars; idempotence, resume, bad input."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import polars as pl
import pytest
from conftest import open_memory, random_pairs
from PIL import Image

from reco_qdrant.ingest import ingest
from reco_qdrant.memory import EncoderMismatchError, Memory
from reco_qdrant.sources import EmbeddingShards, ImageFolder, WebDataset, write_embedding_shards


def make_shards(root, n=1000, d=16, shard_size=400, seed=0):
    img, txt, caps = random_pairs(n, d, seed)
    write_embedding_shards(root, img, txt, caps, shard_size=shard_size,
                           extra={"url": [f"http://x/{i}.jpg" for i in range(n)]})
    return img, txt, caps


def snapshot(mem: Memory) -> dict:
    """Every point: id -> (image bytes, text bytes, payload)."""
    out = {}
    for recs in mem.scroll(500):
        for r in recs:
            out[r.id] = (np.asarray(r.vectors["image"], np.float32).tobytes(),
                         np.asarray(r.vectors["text"], np.float32).tobytes(), r.payload)
    return out


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_ingest_shards_twice_adds_nothing(tmp_path, kind):
    make_shards(tmp_path / "laion")
    with open_memory(kind, tmp_path) as mem:
        r1 = ingest(mem, EmbeddingShards(tmp_path / "laion", batch_size=128), progress=False)
        assert r1.added == 1000 and mem.count() == 1000
        r2 = ingest(mem, EmbeddingShards(tmp_path / "laion", batch_size=128), progress=False)
        assert r2.added == 0 and r2.skipped_batches == 10  # shards of 400, 400, 200 rows in batches of 128
        r3 = ingest(mem, EmbeddingShards(tmp_path / "laion", batch_size=128), progress=False, resume=False)
        assert r3.added == 0 and r3.updated == 1000 and mem.count() == 1000  # an overwrite is never silent
        p = mem.retrieve([mem.search(random_pairs(1000)[0][:1], "image", k=1).ids[0, 0]])[0].payload
        assert p["url"].startswith("http://x/") and p["source"] == str((tmp_path / "laion").resolve())


def test_parallel_upserts_store_every_batch_or_leave_it_to_the_resume(tmp_path):
    """A server memory keeps several upsert requests in flight (`upload_workers`); a batch counts as stored, and
    the ledger moves past it, only when every request of it succeeded."""
    make_shards(tmp_path / "laion")
    with open_memory("local", tmp_path, upload_workers=4, upsert_batch=32) as ref:
        assert ref.backend.upload_workers == 1  # local mode: in this process, threads would only contend
        ingest(ref, EmbeddingShards(tmp_path / "laion", batch_size=200), progress=False)
        expected = snapshot(ref)
    with open_memory("local", tmp_path, upsert_batch=32) as mem:
        mem.backend.upload_workers = 4  # as against a server: requests from 4 threads (local mode queues them)
        client, calls, ended, real = mem.backend.client, [], [], mem.backend.client.upsert

        def failing(name, *args, **kw):  # the server refuses one request of the 4th batch (not a transient error)
            calls.extend([1] if name == mem.backend.name else [])  # (the ledger's own writes are not counted)
            if len(calls) == 3 * 7 + 4:  # batches of 200 rows are 7 requests of at most 32
                raise RuntimeError("refused by the server")
            time.sleep(0.01)
            out = real(name, *args, **kw)
            ended.append(time.monotonic())
            return out

        client.upsert = failing
        with pytest.raises(RuntimeError, match="refused by the server"):
            ingest(mem, EmbeddingShards(tmp_path / "laion", batch_size=200), progress=False)
        raised = time.monotonic()
        time.sleep(0.1)
        assert max(ended) <= raised  # no request of the failed batch ran on after the error reached the caller
        client.upsert = real
        r = ingest(mem, EmbeddingShards(tmp_path / "laion", batch_size=200), progress=False)
        assert r.skipped_batches == 3  # the 4th batch is written again, whole
        got = snapshot(mem)
        assert got.keys() == expected.keys() and mem.count() == 1000
        for pid, (i, t, payload) in expected.items():  # local mode renormalises a rewritten point's vector: 1 ulp
            assert got[pid][2] == payload
            np.testing.assert_allclose(np.frombuffer(got[pid][0], np.float32), np.frombuffer(i, np.float32), atol=1e-6)
            np.testing.assert_allclose(np.frombuffer(got[pid][1], np.float32), np.frombuffer(t, np.float32), atol=1e-6)


def _cli_ingest(shards, mem_path, *extra):
    return [sys.executable, "-m", "reco_qdrant.cli", "ingest", "embeddings", str(shards), "--memory", str(mem_path),
            "--batch-size", "500", "--no-progress", *extra]


@pytest.mark.slow
def test_killed_ingest_resumes_to_the_same_points(tmp_path):
    """SIGKILL `reco ingest` at random points, re-run it, and compare with a clean run bit for bit."""
    n = 40_000
    make_shards(tmp_path / "laion", n=n, d=32, shard_size=15_000)
    # warm-up: a fresh install compiles bytecode on the first run, which would make the clean run look
    # slower than the ones we kill, and the kills land after they have finished
    make_shards(tmp_path / "tiny", n=100, d=32)
    subprocess.run(_cli_ingest(tmp_path / "tiny", tmp_path / "warm"), check=True, capture_output=True, timeout=600)
    t0 = time.perf_counter()  # start-up alone (imports, opening a memory): kills land after it
    subprocess.run(_cli_ingest(tmp_path / "tiny", tmp_path / "warm2"), check=True, capture_output=True, timeout=600)
    t_start = time.perf_counter() - t0
    clean = tmp_path / "clean"
    t0 = time.perf_counter()
    subprocess.run(_cli_ingest(tmp_path / "laion", clean), check=True, capture_output=True, timeout=600)
    t_clean = time.perf_counter() - t0
    rng = random.Random(0)
    killed = tmp_path / "killed"
    kills = []
    sooner = 1.0
    for _ in range(5):
        p = subprocess.Popen(_cli_ingest(tmp_path / "laion", killed), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(sooner * (t_start + rng.uniform(0.4, 0.9) * max(t_clean - t_start, 0.5)))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills.append(p.returncode)
        if p.returncode == 0 and -signal.SIGKILL not in kills:  # done before any kill (the timed runs were slowed
            shutil.rmtree(killed)  # by other load): start over, killing sooner
            sooner /= 2
    subprocess.run(_cli_ingest(tmp_path / "laion", killed), check=True, capture_output=True, timeout=300)
    with Memory.open(str(clean)) as a:
        want = snapshot(a)
    with Memory.open(str(killed)) as b:
        got = snapshot(b)
        assert b.count() == n
    assert -signal.SIGKILL in kills, f"no run was killed mid-way: {kills}"
    assert got.keys() == want.keys()  # nothing lost, nothing duplicated
    assert got == want  # same vectors (bit for bit) and payloads


def test_ingest_bad_shards(tmp_path):
    root = tmp_path / "laion"
    make_shards(root, n=100, shard_size=100)
    with Memory.open(str(tmp_path / "m")) as mem:
        ingest(mem, EmbeddingShards(root), progress=False)
        # truncated .npy
        f = root / "img_emb" / "img_emb_0.npy"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="img_emb_0.npy: not a readable .npy"):
            ingest(mem, EmbeddingShards(root), progress=False)
        f.write_bytes(data)
        # row-count mismatch between .npy and parquet
        meta = root / "metadata" / "metadata_0.parquet"
        pl.read_parquet(meta).head(90).write_parquet(meta)
        with pytest.raises(ValueError, match="row counts differ: img_emb_0.npy has 100.*metadata_0.parquet 90"):
            ingest(mem, EmbeddingShards(root), progress=False)
        # missing caption column
        with pytest.raises(ValueError, match="no column 'text'"):
            make_shards(root, n=100, shard_size=100)
            ingest(mem, EmbeddingShards(root, caption_column="text"), progress=False)
        # dimension of another encoder
        make_shards(tmp_path / "wide", n=10, d=32)
        with pytest.raises(EncoderMismatchError, match="dimension 32, expected 16"):
            ingest(mem, EmbeddingShards(tmp_path / "wide"), progress=False)
        assert mem.count() == 100  # what was stored is intact


def _png(color, size=40) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def image_bytes(color=(0, 0, 0), size=32, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    _png(color, size).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members: dict[str, bytes]):
    """A tar shard holding `members` (name -> bytes), as webdataset writers make them."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_image_folder_and_webdataset(tmp_path, tiny_encoder):
    folder = tmp_path / "imgs"
    folder.mkdir()
    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    rows = []
    for name, c in colors.items():
        _png(c).save(folder / f"{name}.png")
        rows.append({"file": f"{name}.png", "caption": f"a {name} square", "lang": "en"})
    pl.DataFrame(rows).write_csv(tmp_path / "captions.csv")
    tar_path = write_tar(tmp_path / "shard-000.tar", {
        f"sample_{name}.{ext}": data for name, c in colors.items()
        for ext, data in (("jpg", image_bytes(c, 40, "JPEG")), ("txt", f"a {name} photo".encode()),
                          ("json", b'{"license": "cc-by"}'))})
    with Memory.open(str(tmp_path / "m"), encoder=tiny_encoder) as mem:
        r = ingest(mem, ImageFolder(folder, tmp_path / "captions.csv"), tiny_encoder, progress=False)
        assert r.added == 3
        r = ingest(mem, WebDataset([tar_path]), tiny_encoder, progress=False)
        assert r.added == 3 and mem.count() == 6
        assert mem.encoder_record["id"] == tiny_encoder.id
        q = tiny_encoder.encode_images([folder / "red.png"])
        nb = mem.search(q, "image", k=1)
        assert nb.captions[0][0] == "a red square" and nb.payloads[0][0]["uri"].endswith("red.png")
        nb = mem.search(tiny_encoder.encode_texts(["a blue photo"]), "text", k=1)
        assert nb.payloads[0][0]["license"] == "cc-by" and "#sample_blue.jpg" in nb.payloads[0][0]["uri"]


def test_bad_images_and_texts(tmp_path, tiny_encoder):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png((1, 2, 3)).save(folder / "ok.png")
    (folder / "notes.png").write_text("this is not an image")
    good = folder / "ok.png"
    (folder / "trunc.jpg").write_bytes(good.read_bytes()[:30])
    with Memory.open(str(tmp_path / "m"), encoder=tiny_encoder) as mem:
        for name in ("notes.png", "trunc.jpg"):
            table = pl.DataFrame({"file": ["ok.png", name], "caption": ["fine", "broken"]})
            table.write_parquet(tmp_path / "c.parquet")
            with pytest.raises(ValueError, match=f"{name}: not a readable image"):
                ingest(mem, ImageFolder(folder, tmp_path / "c.parquet", batch_size=1), tiny_encoder, progress=False)
        assert mem.count() == 1  # the good batch stays, nothing else
        (tmp_path / "bad.csv").write_bytes(b"file,caption\nok.png,caf\xe9 au lait\n")
        with pytest.raises(ValueError, match="bad.csv: cannot read table"):
            ImageFolder(folder, tmp_path / "bad.csv")
        tar_path = write_tar(tmp_path / "bad.tar", {"a.png": image_bytes((9, 9, 9), 40),
                                                    "a.txt": b"\xff\xfe caption"})
        with pytest.raises(ValueError, match="bad.tar: a.txt is not UTF-8"):
            ingest(mem, WebDataset([tar_path]), tiny_encoder, progress=False)
        assert mem.count() == 1


def test_a_damaged_training_pair_cache_is_a_miss_and_recomputed(tmp_path, tiny_encoder, monkeypatch):
    """`encode_pairs`' cache: a truncated file (BadZipFile), an empty one (EOFError), one whose arrays do not fit
    the source or the encoder, are recomputed, not a traceback; temporary files of failed writes are removed."""
    from reco_qdrant.ingest import encode_pairs

    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for i, c in enumerate([(220, 20, 20), (20, 200, 20), (20, 20, 220)]):
        _png(c).save(folder / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"square {i}"})
    pl.DataFrame(rows).write_csv(tmp_path / "captions.csv")
    src = ImageFolder(folder, tmp_path / "captions.csv")
    cache = tmp_path / "cache"
    first = encode_pairs(src, tiny_encoder, cache, progress=False)
    assert not first.from_cache and encode_pairs(src, tiny_encoder, cache, progress=False).from_cache
    good = first.cache_path.read_bytes()

    def damaged(content: bytes) -> None:
        first.cache_path.write_bytes(content)
        again = encode_pairs(src, tiny_encoder, cache, progress=False)
        assert not again.from_cache and again.keys == first.keys
        np.testing.assert_array_equal(again.image_embeddings, first.image_embeddings)
        assert encode_pairs(src, tiny_encoder, cache, progress=False).from_cache  # written again, whole

    damaged(good[: len(good) // 2])  # truncated
    damaged(b"")  # empty
    buf = io.BytesIO()  # readable, but not these pairs: one pair short, and 8 columns for a 64-d encoder
    np.savez(buf, keys=np.array(first.keys[:2]), captions=np.array(first.captions[:2]),
             image=first.image_embeddings[:2], text=first.text_embeddings[:2], payloads=np.array("[{}, {}]"))
    damaged(buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(first.keys), captions=np.array(first.captions),
             image=first.image_embeddings[:, :8], text=first.text_embeddings[:, :8],
             payloads=np.array(json.dumps(first.payloads)))
    damaged(buf.getvalue())
    buf = io.BytesIO()  # a key missing
    np.savez(buf, keys=np.array(first.keys), image=first.image_embeddings, text=first.text_embeddings)
    damaged(buf.getvalue())

    # a write that failed (disk full) leaves no temporary file; one left by a process that died is removed
    # on the next write; one of a live process (a write in progress) is left alone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stem = first.cache_path.stem
    (cache / f"{stem}.{gone.pid}.tmp.npz").write_bytes(b"half a write")
    (cache / f"{stem}.{os.getppid()}.tmp.npz").write_bytes(b"a write going on")
    first.cache_path.unlink()
    real_savez = np.savez

    def disk_full(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        encode_pairs(src, tiny_encoder, cache, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [f"{stem}.{os.getppid()}.tmp.npz"]
    monkeypatch.setattr(np, "savez", real_savez)
    (cache / f"{stem}.{gone.pid}.tmp.npz").write_bytes(b"half a write")
    assert not encode_pairs(src, tiny_encoder, cache, progress=False).from_cache
    assert sorted(p.name for p in cache.iterdir()) == [f"{stem}.{os.getppid()}.tmp.npz", f"{stem}.npz"]
