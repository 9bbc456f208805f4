"""What the checks on opening an embedded memory cost: the ledger's acknowledged count against the engine's, and
the vectors of a fixed sample of points (`OPEN_SAMPLE`) against unit norm and the vector copy.

Per size: the median of several opens of the same memory with the checks and without them (`check_sample=False`
skips the sample; the count is one engine call either way), and the checks alone on an open memory.

    python benchmarks/open_check.py --n 200000 1000000 --dim 512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import clip_like, print_table, write_results

from reco_qdrant import Memory
from reco_qdrant.memory import OPEN_SAMPLE


def build(path: Path, n: int, dim: int, chunk: int = 50_000) -> None:
    with Memory.open(str(path), auto_index=False) as mem:
        if mem.count() == n:
            return
        for s in range(0, n, chunk):
            img, txt = clip_like(min(chunk, n - s), dim, seed=s)
            mem.add_embeddings(img, txt, [f"caption {i}" for i in range(s, s + len(img))], ids=range(s, s + len(img)),
                               source="bench")


def median_open_s(path: Path, repeats: int, **kw) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        Memory.open(str(path), auto_index=False, migrate=False, **kw).close()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--root", type=Path, default=None, help="where the memories are built (default: a temp dir)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        for n in args.n:
            path = root / f"open-n{n}-d{args.dim}"
            build(path, n, args.dim)
            with_checks = median_open_s(path, args.repeats)
            without = median_open_s(path, args.repeats, check_sample=False)
            with Memory.open(str(path), auto_index=False, migrate=False) as mem:
                t = time.perf_counter()
                for _ in range(args.repeats):
                    mem._check_points()
                checks = (time.perf_counter() - t) / args.repeats
            rows.append({"points": n, "dim": args.dim, "sample": OPEN_SAMPLE, "open_s": round(with_checks, 3),
                         "open_without_sample_s": round(without, 3), "checks_s": round(checks, 4)})
    print_table(rows, "opening an embedded memory: cost of the checks")
    print(write_results("open_check", {"rows": rows}))


if __name__ == "__main__":
    main()
