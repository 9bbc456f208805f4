"""Training benchmark: neighbour-cache build time and epoch time for 100k training pairs, CPU (and GPU).

The memory holds 100k CLIP-like pairs (common.py); the training pairs are 100k other pairs of the
same distribution. The cache is built once (image and text queries), then `train_fusion` runs a
few epochs on it without validation (pure training time per epoch).

    python benchmarks/training.py [--pairs 100000] [--memory-n 100000] [--batch-size 128 256] [--memory-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from common import Timer, clip_like, open_memory, print_table, write_results

from reco_qdrant import train_fusion
from reco_qdrant.training import TrainConfig, neighbour_cache
from reco_qdrant.vector_columns import _written_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--memory-n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[128], help="one row per batch size")
    ap.add_argument("--memory-dir", type=Path, default=None, help="where memories are kept between runs")
    ap.add_argument("--compare-cache", action="store_true",
                    help="also build the cache the old way (every hit's vectors from the engine), for the speed-up")
    args = ap.parse_args()
    img, txt = clip_like(args.memory_n + args.pairs, args.dim)
    img, txt = img[args.memory_n:], txt[args.memory_n:]  # same distribution, not in the memory
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.memory_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        with open_memory(root, args.memory_n, args.dim) as mem:
            cfg = TrainConfig(cache_dir=str(Path(tmp) / "cache"), progress=False, val_fraction=0.0)
            cache_s = {}
            for columns in (False, True) if args.compare_cache else (True,):
                c = replace(cfg, cache_dir=str(Path(tmp) / f"cache-{columns}"))
                with Timer() as tc:
                    neighbour_cache(mem, img, "image", c, None, columns=columns)
                    neighbour_cache(mem, txt, "text", c, None, columns=columns)
                cache_s[columns] = tc.s
            with Timer() as t_own:
                mem.vector_columns(Path(tmp) / "columns", progress=False)
            with Timer() as t_written:  # what a server memory, or one without a vector copy, does
                _written_copy(mem, Path(tmp) / "columns", False)
            cfg = replace(cfg, cache_dir=str(Path(tmp) / "cache-True"))
            for device in devices:
                for bs in args.batch_size:
                    with Timer() as tt:
                        model = train_fusion(mem, img, txt, config=cfg, epochs=args.epochs, device=device,
                                             batch_size=bs)
                    epochs = [h["seconds"] for h in model.history if h["epoch"] > 0]
                    rows.append({"device": device, "batch_size": bs, "pairs": args.pairs, "memory_n": args.memory_n,
                                 "dim": args.dim, "cache_build_s": cache_s[True],
                                 "cache_items_per_s": 2 * args.pairs / cache_s[True],
                                 "cache_build_s_per_hit_vectors": cache_s.get(False),
                                 "columns_own_copy_s": t_own.s, "columns_written_copy_s": t_written.s,
                                 "epoch_s": min(epochs), "epochs": len(epochs),
                                 "train_call_s": tt.s, "cache_reuse_s": tt.s - sum(epochs)})
    print_table(rows, f"fusion training on {args.pairs:,} cached pairs (k={cfg.k})")
    print(f"wrote {write_results('training', {'rows': rows})}")


if __name__ == "__main__":
    main()
