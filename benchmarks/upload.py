"""Ingest throughput against the number of upsert requests kept in flight (`MemoryConfig.upload_workers`).

`reco ingest` writes each batch of a source as requests of `upsert_batch` points; a server memory keeps up to
`upload_workers` of them in flight at once (a batch is stored, and the resume ledger moves past it, once all are).
This ingests N CLIP-like pairs from embedding shards, as `reco ingest embeddings` does, at each worker count:

    python benchmarks/upload.py --n 50000                                   # qdrant-client's local mode
    python benchmarks/upload.py --n 1000000 --server http://localhost:6334  # a Qdrant server or cluster

Local mode is plain Python in this process (calls are serialised on one lock), so there threads only contend:
it shows the client's own cost, and why local mode writes one request at a time; the gain comes from a server,
which applies requests in parallel while the client's threads wait on the network without the GIL.
Writes results/upload.json (or --out).
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

from common import Timer, clip_like, print_table, write_results

from reco_qdrant import Memory
from reco_qdrant.ingest import ingest
from reco_qdrant.sources import EmbeddingShards, write_embedding_shards


def run(n: int, d: int, workers: list[int], location: str, batch: int) -> list[dict]:
    img, txt = clip_like(n, d, seed=5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_embedding_shards(Path(tmp) / "shards", img, txt, [f"caption {i}" for i in range(n)],
                               shard_size=100_000)
        del img, txt
        for w in workers:
            collection = f"upload_bench_{uuid.uuid4().hex[:8]}"
            with Memory.open(location, collection=collection, upload_workers=w) as mem:
                mem.backend.upload_workers = w  # local mode writes one at a time by itself: measured here anyway
                try:
                    with Timer() as t:
                        report = ingest(mem, EmbeddingShards(Path(tmp) / "shards", batch_size=batch),
                                        progress=False, optimize=False)
                    assert report.count == n, (report.count, n)
                finally:
                    if location != ":memory:":
                        mem.backend.client.delete_collection(collection)
                        mem.backend.client.delete_collection(f"{collection}__meta")
            rows.append({"location": "local mode" if location == ":memory:" else location, "upload_workers": w,
                         "pairs": n, "seconds": t.s, "pairs_per_s": n / t.s})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=4096, help="rows per ingest batch (reco ingest's default)")
    ap.add_argument("--server", default=":memory:", help="a Qdrant URL; default: qdrant-client's local mode")
    ap.add_argument("--out", default="upload")
    a = ap.parse_args()
    rows = run(a.n, a.d, a.workers, a.server, a.batch)
    print_table(rows, f"ingest of {a.n:,} pairs, {a.d}-d, batches of {a.batch}, requests of 512 points")
    print(write_results(a.out, {"rows": rows}))


if __name__ == "__main__":
    main()
