"""Retrieval benchmark: our Memory (Qdrant Edge) vs numpy brute force on CLIP-like vectors.

Prints a table and writes JSON to benchmarks/results/. Usage: python benchmarks/retrieval.py --n 20000 100000
(faiss / ScaNN columns need the `bench` extra; they are skipped when not installed).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from reco_qdrant import Memory


def clip_like(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, paired image/text vectors with a shared modality mean, L2-normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), d)).astype(np.float32)
    c = rng.integers(0, len(centres), n)
    gi, gt = rng.standard_normal((2, d)).astype(np.float32)
    img = centres[c] + 0.8 * rng.standard_normal((n, d)).astype(np.float32) + 1.5 * gi
    txt = centres[c] + 0.8 * rng.standard_normal((n, d)).astype(np.float32) + 1.5 * gt
    return (img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True))


def run(n: int, d: int, k: int = 10, batch: int = 256, n_queries: int = 1024) -> dict:
    img, txt = clip_like(n, d)
    queries = clip_like(n_queries, d, seed=1)[0]
    out: dict = {"n": n, "dim": d, "k": k, "batch": batch}
    t = time.perf_counter()
    exact = np.concatenate([np.argpartition(-(queries[s:s + batch] @ img.T), k, axis=1)[:, :k]
                            for s in range(0, n_queries, batch)])
    out["numpy_ms_per_query"] = 1000 * (time.perf_counter() - t) / n_queries
    with tempfile.TemporaryDirectory() as tmp, Memory.open(tmp, auto_index=False) as mem:
        caps = [f"caption {i}" for i in range(n)]
        t = time.perf_counter()
        ids = mem.add_embeddings(img, txt, caps, ids=range(n), source="bench")
        mem.flush()
        out["ingest_items_per_s"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        mem.optimize()
        out["index_build_s"] = time.perf_counter() - t
        mem.search(queries[:batch], "image", k, "text")  # warm-up
        times = []
        found = []
        for s in range(0, n_queries, batch):
            t = time.perf_counter()
            nb = mem.search(queries[s:s + batch], "image", k, "text")
            times.append((time.perf_counter() - t) / len(nb.ids))
            found.append(nb.ids)
        out["edge_ms_per_query_median"] = 1000 * float(np.median(times))
        idx = {pid: i for i, pid in enumerate(ids)}
        got = np.vectorize(idx.get)(np.concatenate(found))
        out["edge_recall_at_10"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact)]))
        out["disk_mb"] = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    rows = [run(n, args.dim) for n in args.n]
    keys = list(rows[0])
    print(" | ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(" | ".join(f"{r[k]:>14.3f}" if isinstance(r[k], float) else f"{r[k]:>14}" for k in keys))
    res = {"machine": f"{platform.machine()} {platform.processor()} ({__import__('os').cpu_count()} cores)",
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    path = Path(__file__).parent / "results" / "retrieval.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
