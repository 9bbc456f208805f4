"""Retrieval benchmark: our Memory (Qdrant Edge; qdrant-client :memory: at <= 20k) vs numpy brute
force, faiss HNSW and ScaNN, on CLIP-like 512-d vectors, all in the same run.

Workload: batches of 256 image queries (held-out items of the same distribution), k=10, each hit
returning the other modality's vector and its caption. Reports ingest items/s, index build s,
search ms/query (median over batches; also with ids and captions only, and ids only), recall@10 vs
exact, resident memory and disk. Resident memory is the RSS growth of building the index (faiss,
ScaNN; one field) or, for an Edge memory, of a fresh process that opens it and runs the searches (what
a user's process holds), split into its own (anonymous) pages and mapped files' pages. "Edge direct"
rows call Qdrant Edge without reco_qdrant (same data, settings and return), so our wrapper's share is
the difference and their ids-only figure is the floor no wrapper goes below. Qdrant Edge searches a
batch on one core; faiss uses every core unless `--faiss-threads 1`. The "API path" row fills a memory
through `Memory.add_embeddings` and searches at once, as README does.

    python benchmarks/retrieval.py --n 100000 1000000      # faiss / ScaNN need the `bench` extra
    python benchmarks/retrieval.py --n 200000 --noise 0.3 --engines faiss edge direct on-disk \
        --ef 16 32 64 --faiss-ef 16 24 32 64 --faiss-threads 0 1 --out retrieval_200k_easy
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import Timer, clip_like, dir_mb, exact_topk, print_table, recall, rss_mb, write_results

from reco_qdrant import Memory
from reco_qdrant.memory import point_id

K, BATCH = 10, 256


def _search_batches(fn, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """Run `fn(batch) -> [b, k] indices` over batches; (indices, median ms/query) of a second pass: the first
    brings the pages the queries touch into memory (this machine's kernel reclaims idle pages within minutes)."""
    for s in range(0, len(queries), BATCH):
        fn(queries[s:s + BATCH])
    found, times = [], []
    for s in range(0, len(queries), BATCH):
        with Timer() as t:
            found.append(fn(queries[s:s + BATCH]))
        times.append(t.s / len(found[-1]))
    return np.concatenate(found), 1000 * float(np.median(times))


def bench_numpy(img, txt, caps, queries, exact) -> dict:
    def fn(q):
        idx = exact_topk(q, img, K)
        _ = txt[idx], [[caps[j] for j in row] for row in idx]  # same return as the others
        return idx
    found, ms = _search_batches(fn, queries)
    return {"engine": "numpy exact", "ms_per_query": ms, "recall@10": recall(found, exact)}


def bench_faiss(img, txt, caps, queries, exact, m: int, ef_construct: int, efs: list[int],
                threads: list[int]) -> list[dict]:
    """faiss HNSW built once, searched at each ef (so our rows can be compared at the same recall) and on each
    number of threads (0: faiss's default, every core)."""
    import faiss

    r0 = rss_mb()
    with Timer() as tb:
        index = faiss.IndexHNSWFlat(img.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construct
        index.add(img)
    rss = rss_mb() - r0
    rows, default_threads = [], faiss.omp_get_max_threads()
    for t, ef in ((t, ef) for t in threads for ef in efs):
        faiss.omp_set_num_threads(t or default_threads)
        index.hnsw.efSearch = ef

        def fn(q):
            idx = index.search(q, K)[1]
            _ = txt[idx], [[caps[j] for j in row] for row in idx]
            return idx
        found, ms = _search_batches(fn, queries)
        rows.append({"engine": f"faiss HNSW m={m} efc={ef_construct} ef={ef} threads={t or default_threads}",
                     "index_build_s": tb.s, "ms_per_query": ms, "recall@10": recall(found, exact), "rss_mb": rss})
    faiss.omp_set_num_threads(default_threads)
    return rows


def bench_scann(img, txt, caps, queries, exact) -> list[dict]:
    """ScaNN (tree + asymmetric hashing + reordering), sweeping leaves searched; all settings reported."""
    import scann

    n = len(img)
    leaves = max(2, int(math.sqrt(n)))
    r0 = rss_mb()
    with Timer() as tb:
        searcher = (scann.scann_ops_pybind.builder(img, K, "dot_product")
                    .tree(num_leaves=leaves, num_leaves_to_search=max(1, leaves // 10),
                          training_sample_size=min(n, 250_000))
                    .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(400).build())
    rows = []
    for frac, reorder in ((0.02, 100), (0.05, 100), (0.1, 200), (0.2, 250), (0.3, 400)):
        search = max(1, int(leaves * frac))

        def fn(q, search=search, reorder=reorder):
            idx = searcher.search_batched_parallel(q, leaves_to_search=search,
                                                   pre_reorder_num_neighbors=reorder)[0]
            idx = idx.astype(np.int64)
            _ = txt[idx], [[caps[j] for j in row] for row in idx]
            return idx
        found, ms = _search_batches(fn, queries)
        rows.append({"engine": f"ScaNN leaves {search}/{leaves} reorder {reorder}", "index_build_s": tb.s,
                     "ms_per_query": ms, "recall@10": recall(found, exact), "rss_mb": rss_mb() - r0})
    return rows


def bench_memory(img, txt, caps, queries, exact, location: str, efs: list[int], keep: Path | None = None,
                 **settings) -> list[dict]:
    """Our Memory: ingest (upsert), index build, search at several hnsw_ef, text vectors + captions returned.

    With `keep`, the Edge memory is built there (and left for inference.py / training.py to reuse)."""
    n = len(img)
    with tempfile.TemporaryDirectory() as tmp:
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir(parents=True)
            tmp = str(keep)
        loc = tmp if location == "edge" else location
        r0 = rss_mb()
        with Memory.open(loc, auto_index=False, **settings) as mem:
            with Timer() as ti:
                ids = mem.add_embeddings(img, txt, caps, ids=range(n), source="bench")
                mem.flush()
            with Timer() as tb:
                mem.optimize()
            where = {pid: i for i, pid in enumerate(ids)}
            label = f"Memory {location} {mem.cfg.quantization or 'float'}{' on-disk' if mem.cfg.on_disk else ''}"
            base = {"ingest_items_per_s": n / ti.s, "index_build_s": tb.s}
            rows = []
            for ef in efs:
                mem.backend.cfg = replace(mem.backend.cfg, hnsw_ef=ef)

                def fn(q, ret="text"):
                    nb = mem.search(q, "image", K, ret)
                    return np.vectorize(where.get, otypes=[np.int64])(nb.ids)
                found, ms = _search_batches(fn, queries)
                _, ms_captions = _search_batches(lambda q: fn(q, None), queries)
                _, ms_ids = _search_batches(lambda q: np.asarray(mem.search(q, "image", K, None,
                                                                            with_payload=False).ids), queries)
                rows.append({"engine": f"{label} ef={ef}", **base, "ms_per_query": ms,
                             "ms_ids_captions": ms_captions, "ms_ids_only": ms_ids, "recall@10": recall(found, exact),
                             "rss_mb": rss_mb() - r0})  # on Edge replaced by a fresh process's figure below
            st = mem.backend.status()
        extra = {"segments": st.get("segments")}
        if location == "edge":
            extra.update(disk_mb=dir_mb(tmp), **_reopened_rss(tmp, queries, settings))
        for r in rows:
            r.update(extra)
    return rows


def bench_edge_direct(img, txt, caps, queries, exact, efs: list[int], quantization: str | None = "int8") -> list[dict]:
    """Qdrant Edge called directly, no reco_qdrant in between: integer ids, the same collection settings
    (MemoryConfig defaults), the same search parameters and the same return (text vector + caption per hit,
    the vectors handed to numpy). Tells "the engine" from "our wrapper" in one run."""
    import qdrant_edge as qe

    from reco_qdrant.config import MemoryConfig

    cfg, n = MemoryConfig(), len(img)
    quant = (qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
             if quantization == "int8" else None)
    vp = {m: qe.EdgeVectorParams(size=img.shape[1], distance=qe.Distance.Cosine) for m in ("image", "text")}
    hnsw = qe.HnswIndexConfig(m=cfg.hnsw_m, ef_construct=cfg.hnsw_ef_construct,
                              full_scan_threshold=cfg.full_scan_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        shard = qe.EdgeShard.create(tmp, qe.EdgeConfig(vectors=vp, hnsw_config=hnsw, quantization_config=quant))
        with Timer() as ti:
            for s in range(0, n, cfg.upsert_batch):
                e = min(n, s + cfg.upsert_batch)
                shard.update(qe.UpdateOperation.upsert_points([
                    qe.Point(i, {"image": a, "text": b}, {"caption": c})
                    for i, a, b, c in zip(range(s, e), img[s:e].tolist(), txt[s:e].tolist(), caps[s:e])]))
        with Timer() as tb:
            shard.optimize()
        rows = []
        for ef in efs:
            rescore = qe.QuantizationSearchParams(rescore=True, oversampling=2.0) if quant else None
            params = qe.SearchParams(hnsw_ef=ef, quantization=rescore)

            def fn(q, with_vector=("text",), with_payload=True, params=params):
                reqs = [qe.QueryRequest(limit=K, query=qe.Query.Nearest(x, using="image"), params=params,
                                        with_vector=list(with_vector) or False, with_payload=with_payload)
                        for x in q.tolist()]
                res = shard.query_batch(qe.QueryBatchRequest(reqs))
                if with_vector:
                    _ = np.asarray([[p.vector["text"] for p in hits] for hits in res], np.float32)
                if with_payload:
                    _ = [[p.payload["caption"] for p in hits] for hits in res]
                return np.array([[p.id for p in hits] for hits in res], np.int64)
            found, ms = _search_batches(fn, queries)
            _, ms_captions = _search_batches(lambda q: fn(q, ()), queries)
            _, ms_ids = _search_batches(lambda q: fn(q, (), False), queries)
            rows.append({"engine": f"Edge direct {quantization or 'float'} ef={ef}",
                         "ingest_items_per_s": n / ti.s, "index_build_s": tb.s, "ms_per_query": ms,
                         "ms_ids_captions": ms_captions, "ms_ids_only": ms_ids, "recall@10": recall(found, exact),
                         "segments": shard.info().segments_count})
        shard.close()
    return rows


def bench_api_path(img, txt, caps, queries, exact, chunk: int = 10_000) -> dict:
    """What README's Python path does: `Memory.open`, `add_embeddings` in chunks, then search at once (the
    memory indexes itself before the first search; that search's time includes the build)."""
    n = len(img)
    with tempfile.TemporaryDirectory() as tmp, Memory.open(tmp) as mem:
        with Timer() as ti:
            for s in range(0, n, chunk):
                mem.add_embeddings(img[s:s + chunk], txt[s:s + chunk], caps[s:s + chunk],
                                   ids=range(s, min(n, s + chunk)), source="bench")
        with Timer() as tf:
            first = mem.search(queries[:BATCH], "image", K, "text")
        where = {pid: i for i, pid in enumerate(point_id("bench", i) for i in range(n))}

        def fn(q):
            return np.vectorize(where.get, otypes=[np.int64])(mem.search(q, "image", K, "text").ids)
        found, ms = _search_batches(fn, queries)
    assert len(first.ids) == BATCH
    return {"engine": "Memory API path: add, then search", "ingest_items_per_s": n / ti.s,
            "first_search_s": tf.s, "ms_per_query": ms, "recall@10": recall(found, exact)}


_RSS_PROBE = """
import json, sys, numpy as np
sys.path.insert(0, {bench!r})
from common import resident_mb
import qdrant_edge
from reco_qdrant import Memory
from reco_qdrant.memory import point_id
base = resident_mb()  # after imports: what the memory itself adds
q = np.load({queries!r})
with Memory.open({path!r}, **{settings!r}) as mem:
    for s in range(0, len(q), 256):
        mem.search(q[s:s + 256], "image", 10, "text")
    now = resident_mb()
    print(json.dumps({{k: now[k] - base[k] for k in now}}))
"""


def _reopened_rss(path: str, queries: np.ndarray, settings: dict) -> dict:
    """Resident memory of the memory opened afresh in another process and searched: what a user's process holds."""
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as qdir:
        qfile = Path(qdir) / "queries.npy"
        np.save(qfile, queries)
        code = _RSS_PROBE.format(bench=str(Path(__file__).parent), queries=str(qfile), path=path, settings=settings)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(n: int, d: int, engines: set[str], n_queries: int, efs: list[int], keep: Path | None,
        faiss_efs: list[int], faiss_threads: list[int], noise: float) -> list[dict]:
    img, txt = clip_like(n + n_queries, d, noise=noise)
    queries, img, txt = img[n:].copy(), img[:n], txt[:n]
    caps = [f"caption {i}" for i in range(n)]
    exact = exact_topk(queries, img, K)
    rows = []
    if "numpy" in engines:
        rows.append(bench_numpy(img, txt, caps, queries, exact))
    if "faiss" in engines:
        rows.extend(bench_faiss(img, txt, caps, queries, exact, 16, 100, faiss_efs, faiss_threads))
    if "scann" in engines:
        rows.extend(bench_scann(img, txt, caps, queries, exact))
    gc.collect()
    if "edge" in engines:  # MemoryConfig's defaults: int8 with rescoring
        rows.extend(bench_memory(img, txt, caps, queries, exact, "edge", efs,
                                 keep=keep / f"n{n}-d{d}" if keep else None))
    if "direct" in engines:
        rows.extend(bench_edge_direct(img, txt, caps, queries, exact, efs, quantization="int8"))
    if "float" in engines:
        rows.extend(bench_memory(img, txt, caps, queries, exact, "edge", efs[-1:], quantization=None))
    if "binary" in engines:
        rows.extend(bench_memory(img, txt, caps, queries, exact, "edge", efs, quantization="binary", on_disk=True))
    if "on-disk" in engines:  # originals on disk (mmap), int8 in RAM: Qdrant's layout for large collections
        rows.extend(bench_memory(img, txt, caps, queries, exact, "edge", efs, on_disk=True))
    if "direct-float" in engines:
        rows.extend(bench_edge_direct(img, txt, caps, queries, exact, efs[-1:], quantization=None))
    if "api" in engines:
        rows.append(bench_api_path(img, txt, caps, queries, exact))
    if "local" in engines and n <= 20_000:
        rows.extend(bench_memory(img, txt, caps, queries, exact, ":memory:", efs[:1]))
    for r in rows:
        r["n"], r["noise"] = n, noise
        if r.get("rss_mb") is not None:
            r["rss_bytes_per_item"] = r["rss_mb"] * 2**20 / n
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256], help="hnsw_ef values for our Memory")
    ap.add_argument("--faiss-ef", type=int, nargs="+", default=[128, 256], help="efSearch values for faiss HNSW")
    ap.add_argument("--faiss-threads", type=int, nargs="+", default=[0],
                    help="faiss's OpenMP threads (0: its default, every core); Qdrant Edge searches on one")
    ap.add_argument("--noise", type=float, default=0.6,
                    help="items' spread around their concept (0.3: well-clustered data, where HNSW is cheap)")
    ap.add_argument("--engines", nargs="+", default=["numpy", "faiss", "scann", "edge", "direct", "float",
                                                     "direct-float", "api", "local"],
                    help="edge/direct: our Memory / Qdrant Edge directly, int8 (the default); float, direct-float: "
                         "the same without quantization; on-disk: our Memory with original vectors on disk; binary: "
                         "with binary quantization and original vectors on disk")
    ap.add_argument("--out", default="retrieval")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the Edge memories in KEEP/n<N>-d<D> (inference.py and training.py reuse them)")
    args = ap.parse_args()
    engines = set(args.engines)
    for name in ("faiss", "scann"):
        try:
            __import__(name)
        except ImportError:
            print(f"{name} not installed (pip install -e '.[bench]'): skipped")
            engines.discard(name)
    rows: list[dict] = []
    for n in args.n:
        rows.extend(run(n, args.dim, engines, args.queries, args.ef, args.keep, args.faiss_ef, args.faiss_threads,
                        args.noise))
        print_table([r for r in rows if r["n"] == n], f"n={n:,}, d={args.dim}, k={K}, batches of {BATCH}")
        path = write_results(args.out, {"dim": args.dim, "k": K, "batch": BATCH, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
