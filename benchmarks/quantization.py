"""How many candidates a quantized memory must fetch before rescoring: recall@10 against oversampling and hnsw_ef.

A quantized memory searches its int8 or binary codes for `oversampling * k` candidates and rescores them on the
float vectors; too few candidates lose true neighbours the codes ranked low. This sweeps the factor the search
uses (`reco_qdrant.backends.base.OVERSAMPLING`) on CLIP-like data, so its defaults rest on a figure.

    python benchmarks/quantization.py --n 200000 --quantization binary int8

Writes results/quantization.json.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from common import Timer, clip_like, exact_topk, print_table, recall, write_results

from reco_qdrant import Memory
from reco_qdrant.backends import base

K = 10


def sweep(img, txt, queries, exact, quantization: str, factors: list[float], efs: list[int]) -> list[dict]:
    caps = [f"caption {i}" for i in range(len(img))]
    rows = []
    default = base.OVERSAMPLING[quantization]
    with tempfile.TemporaryDirectory() as tmp, Memory.open(tmp, auto_index=False, quantization=quantization,
                                                           on_disk=True) as mem:
        with Timer() as tb:
            ids = mem.add_embeddings(img, txt, caps, ids=range(len(img)), source="bench")
            mem.flush()
            mem.optimize()
        where = {pid: i for i, pid in enumerate(ids)}
        try:
            for f in factors:
                base.OVERSAMPLING[quantization] = f
                for ef in efs:
                    mem.search(queries, "image", K, None, hnsw_ef=ef)  # warm the pages this setting touches
                    with Timer() as ts:
                        nb = mem.search(queries, "image", K, None, hnsw_ef=ef)
                    found = np.vectorize(where.get, otypes=[np.int64])(nb.ids)
                    rows.append({"quantization": quantization, "oversampling": f, "hnsw_ef": ef,
                                 "recall@10": recall(found, exact), "ms_per_query": 1e3 * ts.s / len(queries),
                                 "build_s": tb.s})
        finally:
            base.OVERSAMPLING[quantization] = default
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--noise", type=float, default=0.6, help="spread within a concept (common.clip_like)")
    ap.add_argument("--quantization", nargs="+", default=["binary", "int8"], choices=sorted(base.OVERSAMPLING))
    ap.add_argument("--oversampling", nargs="+", type=float, default=[1, 1.5, 2, 3, 4, 6, 8])
    ap.add_argument("--ef", nargs="+", type=int, default=[32, 64, 128, 256])
    a = ap.parse_args()
    img, txt = clip_like(a.n + a.queries, a.d, noise=a.noise)
    queries, img, txt = img[a.n:].copy(), img[:a.n], txt[:a.n]
    exact = exact_topk(queries, img, K)
    rows = []
    for q in a.quantization:
        rows.extend(sweep(img, txt, queries, exact, q, a.oversampling, a.ef))
    print_table(rows, f"recall@10 against oversampling, n={a.n:,}, {a.d}-d, noise {a.noise}, k={K}, original vectors "
                      "on disk (the engine's page cache holds them here)")
    print(write_results("quantization", {"n": a.n, "d": a.d, "noise": a.noise, "defaults": base.OVERSAMPLING,
                                         "rows": rows}))


if __name__ == "__main__":
    main()
