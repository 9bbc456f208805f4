"""Inference benchmark: plain CLIP predict vs RECO predict, same encoder, same 64 images, 100 classes.

The encoders are real open_clip models with random weights (ViT-B-32, and the smallest built-in
config ViT-S-32-alt); the memory holds CLIP-like vectors of the encoder's dimension (see common.py).
Class embeddings are refined once (`set_classes`, reported apart); predict then costs encode +
search + fuse + score, through the default coverage gate (mean fusion of the same neighbours, the trust reading
and the encoder's scores). The first prediction also reads the gate's reference (a sample of the memory's pairs,
searched and refined): reported apart, as `first_predict_s`. Reports both predict times (medians, run in turns),
their ratio, the split (best of the repeats) and the ratio the split implies, which is less exposed to the noise of
encoding.

    python benchmarks/inference.py --n 100000 1000000 [--memory-dir DIR]   # DIR: reuse/keep memories
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import Timer, open_memory, print_table, write_results
from PIL import Image

from reco_qdrant import RecoClassifier, load_encoder
from reco_qdrant.fusion import FusionConfig, FusionModel

K = 10


def images(n: int = 64, size: int = 224, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def alternating(a, b, repeat: int) -> tuple[float, float]:
    """Median times of a() and b(), run in turns so that a noisy machine's drift hits both alike."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeat):
        for fn, out in ((a, ta), (b, tb)):
            with Timer() as t:
                fn()
            out.append(t.s)
    return float(np.median(ta)), float(np.median(tb))


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        with Timer() as t:
            fn()
        times.append(t.s)
    return min(times)


def run(model: str, n: int, root: Path, repeat: int) -> dict:
    torch.manual_seed(0)
    enc = load_encoder(model, None, device="cpu")
    ims = images()
    classes = [f"species number {i}" for i in range(100)]
    with open_memory(root, n, enc.dim) as mem:
        fusion = FusionModel(FusionConfig(dim=enc.dim, k=K))
        plain = RecoClassifier(encoder=enc, use_retrieval=False).set_classes(classes)
        reco = RecoClassifier(mem, fusion, encoder=enc)
        with Timer() as tc:
            reco.set_classes(classes)
        with Timer() as tf:
            reco.predict(ims)  # reads the coverage reference and the gate's scale
        t_plain, t_reco = alternating(lambda: plain.predict(ims), lambda: reco.predict(ims), repeat)
        emb = enc.encode_images(ims)
        searched = fusion.needs_searched_vectors
        nb = mem.search(emb, "image", K, "text", with_searched_vectors=searched)
        split = {
            "encode_s": best_of(lambda: enc.encode_images(ims), repeat),
            "search_s": best_of(lambda: mem.search(emb, "image", K, "text", with_searched_vectors=searched), repeat),
            "fuse_s": best_of(lambda: fusion.refine_numpy("image", emb, nb.vectors, nb.mask, scores=nb.scores,
                                                          searched=nb.searched_vectors)[0], repeat),
            "score_s": best_of(lambda: softmax(100 * emb @ reco.class_embeddings_.T), repeat),
        }
    base = split["encode_s"] + split["score_s"]
    return {"model": model, "dim": enc.dim, "memory_n": n, "images": len(ims), "classes": len(classes),
            "plain_predict_s": t_plain, "reco_predict_s": t_reco, "ratio": t_reco / t_plain,
            "ratio_from_split": (base + split["search_s"] + split["fuse_s"]) / base,
            "set_classes_once_s": tc.s, "first_predict_s": tf.s, **split}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-S-32-alt"])
    ap.add_argument("--small-model-n", type=int, default=100_000, help="memory size for models after the first")
    ap.add_argument("--memory-dir", type=Path, default=None, help="where memories are kept between runs")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="inference", help="results name under benchmarks/results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.memory_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for i, model in enumerate(args.models):
            for n in (args.n if i == 0 else [args.small_model_n]):
                rows.append(run(model, n, root, args.repeat))
                print_table(rows[-1:], f"{model}, memory {n:,}")
                path = write_results(args.out, {"k": K, "rows": rows})
    print_table(rows, "plain CLIP vs RECO predict (64 images, 100 classes, k=10)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
