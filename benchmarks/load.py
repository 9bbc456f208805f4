"""Load: search threads on an embedded memory while another thread ingests into it.

Eight threads search (batches of 8 image queries, k=10, text vectors and captions returned) for as long as
one thread upserts N CLIP-like pairs in batches of 1,024. Reported: search latency p50/p99 (ms per call),
searches run, errors (any exception in any thread), ingest items/s, and whether every acknowledged write
is visible afterwards (count, a sample of ids retrieved, each sampled pair found as its own nearest neighbour).

    python benchmarks/load.py [--n 200000] [--threads 8]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import numpy as np
from common import clip_like, print_table, write_results

from reco_qdrant import Memory
from reco_qdrant.memory import point_id


def run_load(n: int, dim: int = 512, threads: int = 8, batch: int = 1024, k: int = 10,
             location: str | None = None) -> dict:
    img, txt = clip_like(n + 2048, dim, seed=3)
    queries, img, txt = img[n:], img[:n], txt[:n]
    caps = [f"caption {i}" for i in range(n)]
    errors: list[str] = []
    latencies: list[list[float]] = [[] for _ in range(threads)]
    done = threading.Event()
    with tempfile.TemporaryDirectory() as tmp, Memory.open(location or tmp) as mem:
        mem.add_embeddings(img[:batch], txt[:batch], caps[:batch], ids=range(batch), source="load")
        acked = [batch]

        def writer() -> None:
            try:
                for s in range(batch, n, batch):
                    e = min(n, s + batch)
                    mem.add_embeddings(img[s:e], txt[s:e], caps[s:e], ids=range(s, e), source="load")
                    acked[0] = e
            except Exception as ex:  # reported, not raised: the run goes on and counts it
                errors.append(f"writer: {type(ex).__name__}: {ex}")
            finally:
                done.set()

        def reader(i: int) -> None:
            rng = np.random.default_rng(i)
            while not done.is_set():
                q = queries[rng.integers(0, len(queries), 8)]
                t0 = time.perf_counter()
                try:
                    nb = mem.search(q, "image", k, "text")
                    if nb.vectors.shape != (8, k, dim) or not all(c for row in nb.captions for c in row):
                        errors.append(f"reader {i}: incomplete result")
                except Exception as ex:
                    errors.append(f"reader {i}: {type(ex).__name__}: {ex}")
                latencies[i].append(1000 * (time.perf_counter() - t0))

        t0 = time.perf_counter()
        pool = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
        pool.append(threading.Thread(target=writer))
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        seconds = time.perf_counter() - t0
        sample = np.random.default_rng(0).choice(acked[0], min(500, acked[0]), replace=False)
        found = mem.existing_ids([point_id("load", int(i)) for i in sample])
        own = mem.search(img[sample[:100]], "image", 1, None, with_payload=False, exact=True)
        visible = (mem.count() == acked[0] and len(found) == len(sample)
                   and all(own.ids[j, 0] == point_id("load", int(i)) for j, i in enumerate(sample[:100])))
    lat = np.concatenate([np.asarray(x) for x in latencies if x]) if any(latencies) else np.zeros(1)
    return {"points": n, "dim": dim, "threads": threads, "searches": int(sum(len(x) for x in latencies)),
            "errors": len(errors), "first_errors": errors[:3], "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()), "ingest_items_per_s": n / seconds,
            "seconds": seconds, "acknowledged": acked[0], "all_visible": bool(visible)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    row = run_load(args.n, args.dim, args.threads)
    print_table([{k: v for k, v in row.items() if k != "first_errors"}],
                f"{args.threads} search threads while one thread ingests {args.n:,} pairs (embedded memory)")
    for e in row["first_errors"]:
        print("error:", e)
    print(f"wrote {write_results('load', {'rows': [row]})}")


if __name__ == "__main__":
    main()
