"""Real open_clip code with random weights (tiny config) and checkpoints saved and reloaded from files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reco_qdrant import Memory, RecoClassifier, load_encoder, train_fusion
from reco_qdrant.ingest import ingest
from reco_qdrant.memory import EncoderMismatchError
from reco_qdrant.sources import ImageFolder


def test_tiny_encoder_outputs(tiny_encoder):
    im = [Image.new("RGB", (50, 30), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 200))]
    v = tiny_encoder.encode_images(im)
    t = tiny_encoder.encode_texts(["a red thing", "a blue thing", "x"])
    assert v.shape == (2, 64) and t.shape == (3, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert tiny_encoder.id == "open_clip/reco-tiny/random-seed0"


def test_checkpoint_file_loads_identically(tiny_encoder, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}, str(path))
    other = load_encoder("reco-tiny", str(path), device="cpu")  # the real pretrained=<file> path
    assert other.id.startswith("open_clip/reco-tiny/file-sha256:")
    texts = ["a photo of a bird", "a photo of a flower"]
    np.testing.assert_array_equal(other.encode_texts(texts), tiny_encoder.encode_texts(texts))
    im = [Image.new("RGB", (64, 64), (i * 40, 100, 200 - i * 40)) for i in range(3)]
    np.testing.assert_array_equal(other.encode_images(im), tiny_encoder.encode_images(im))
    torch.save(tiny_encoder.model.state_dict(), tmp_path / "tiny.pt")  # a torch file loads weights_only
    assert load_encoder("reco-tiny", str(tmp_path / "tiny.pt"), device="cpu").encode_texts(texts).shape == (2, 64)
    with Memory.open(":memory:", encoder=tiny_encoder) as mem:
        mem.add_embeddings(tiny_encoder.encode_images(im), tiny_encoder.encode_texts(["a", "b", "c"]),
                           ["a", "b", "c"], encoder_id=tiny_encoder.id)
        with pytest.raises(EncoderMismatchError, match="was built with encoder 'open_clip/reco-tiny/random-seed0'"):
            mem.check_encoder(other.id, other.dim)
        with pytest.raises(EncoderMismatchError):
            RecoClassifier(mem, None, encoder=other, use_retrieval=False)


def test_classifier_end_to_end_on_generated_images(tiny_encoder, tmp_path):
    """Generated images + captions -> memory -> trained fusion -> predict on image files."""
    import polars as pl

    rng = np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for name, c in colors.items():
        for i in range(12):
            arr = np.clip(np.array(c) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{name}_{i}.png")
            rows.append({"file": f"{name}_{i}.png", "caption": f"a {name} square, picture {i}"})
    pl.DataFrame(rows).write_parquet(tmp_path / "captions.parquet")
    with Memory.open(str(tmp_path / "m"), encoder=tiny_encoder) as mem:
        ingest(mem, ImageFolder(folder, tmp_path / "captions.parquet"), tiny_encoder, progress=False)
        paths = [folder / r["file"] for r in rows]
        img = tiny_encoder.encode_images(paths)
        txt = tiny_encoder.encode_texts([r["caption"] for r in rows])
        labels = np.repeat(np.arange(4), 12)
        fusion = train_fusion(mem, img, txt, labels=labels, k=5, epochs=2, batch_size=16, val_fraction=0,
                              n_heads=4, progress=False, device="cpu", cache_dir=str(tmp_path / "c"))
        clf = RecoClassifier(mem, fusion, encoder=tiny_encoder).set_classes(list(colors), ["a {} square."])
        pred = clf.predict(paths[::12])
        proba = clf.predict_proba(paths[::12])
    assert len(pred) == 4 and set(pred) <= set(colors)
    assert proba.shape == (4, 4)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
