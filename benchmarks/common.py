"""Shared helpers of the benchmarks: CLIP-like data, timing, memory, table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from reco_qdrant import Memory

RESULTS = Path(__file__).parent / "results"
# zero-shot columns scored as the classifier does by default, through the coverage gate, and also without it, as
# "<column>, no gate"; every other column is its fusion alone (gate="none")
GATED = ("RECO", "RECO untrained")


def gate_columns(col: str, gated: tuple[str, ...] = GATED) -> list[tuple[str, str]]:
    """(gate, column name) pairs to score a zero-shot column with: a gated column by default and without the gate."""
    return [("coverage", col), ("none", f"{col}, no gate")] if col in gated else [("none", col)]


def clip_like(n: int, d: int = 512, seed: int = 0, per_cluster: int = 50,
              noise: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Paired image/text vectors [n, d] float32, L2-normalised, shaped like CLIP embeddings.

    Items fall in clusters (a concept each, ~`per_cluster` items); image and text of a pair share
    the concept and differ by their own noise plus a modality mean (CLIP's "modality gap").
    Variance decays as a power law over dimensions (real CLIP embeddings have most of their
    variance in ~100 directions), so neighbours are meaningful rather than all equidistant.
    """
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, d + 1, dtype=np.float32) ** -0.5)  # std per dimension
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    centres = rng.standard_normal((max(1, n // per_cluster), d)).astype(np.float32) * scale
    gap_i, gap_t = (rng.standard_normal((2, d)).astype(np.float32) * scale) * 0.8
    c = rng.integers(0, len(centres), n)
    out = []
    for gap in (gap_i, gap_t):
        x = np.empty((n, d), np.float32)
        for s in range(0, n, 100_000):  # in chunks: no float64 or [n, d] temporaries beyond the output
            e = min(n, s + 100_000)
            z = centres[c[s:e]] + noise * rng.standard_normal((e - s, d), dtype=np.float32) * scale + gap
            x[s:e] = z @ rot
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out.append(x)
    return out[0], out[1]


def exact_topk(queries: np.ndarray, base: np.ndarray, k: int, batch: int = 256) -> np.ndarray:
    """Brute-force top-k indices [B, k] by inner product (float32 matmul + argpartition)."""
    return np.concatenate([np.argpartition(-(queries[s:s + batch] @ base.T), k, axis=1)[:, :k]
                           for s in range(0, len(queries), batch)])


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found, rows of indices [B, k] (-1 = missing)."""
    k = exact.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, exact)]))


def rss_mb() -> float:
    """Resident set size of this process, MiB."""
    return resident_mb()["rss_mb"]


def resident_mb() -> dict[str, float]:
    """This process's resident memory, MiB: all of it, its own (anonymous) pages, and pages of mapped files
    (`/proc/self/smaps_rollup`; file pages belong to the page cache and the kernel may reclaim them)."""
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap pages back to the OS so that RSS shows what is still held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0]) / 1024
    anon = fields.get("Anonymous", 0.0)
    return {"rss_mb": fields["Rss"], "anon_mb": anon, "file_mb": fields["Rss"] - anon - fields.get("Pss_Shmem", 0.0)}


def dir_mb(path: str | os.PathLike) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


class Timer:
    def __enter__(self) -> Timer:
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def print_table(rows: list[dict], title: str) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = [(k, max(len(k), *(len(_cell(r.get(k))) for r in rows))) for k in keys]
    print(f"\n{title}")
    print(" | ".join(k.rjust(w) for k, w in fmt))
    print("-+-".join("-" * w for _, w in fmt))
    for r in rows:
        print(" | ".join(_cell(r.get(k)).rjust(w) for k, w in fmt))


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def open_memory(root: Path, n: int, dim: int) -> Memory:
    """The memory of n CLIP-like pairs at root/n{n}-d{dim}, built (ingest + index) unless it is there already."""
    path = root / f"n{n}-d{dim}"
    mem = Memory.open(str(path), auto_index=False)
    if mem.count() != n:
        img, txt = clip_like(n, dim)
        mem.add_embeddings(img, txt, [f"caption {i}" for i in range(n)], ids=range(n), source="bench")
        mem.flush()
        mem.optimize()
    return mem
