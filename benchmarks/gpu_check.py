"""GPU check: training (bf16 autocast), the neighbour cache and inference on CUDA, against CPU.

One prepared script for the day a GPU machine is available:

    python benchmarks/gpu_check.py                 # CUDA; exits 2 where there is none
    python benchmarks/gpu_check.py --device cpu --quick   # a dry run of the script itself (the test suite)

On the synthetic world it trains the relevance fusion and the paper's transformer on the device
(precision "auto": bf16 autocast where the chip has it) and on the CPU (fp32), same seed, and compares
their zero-shot top-1; it runs the CPU-trained model's inference on both and compares the class
probabilities. With the real-image benchmark's data (`../shared/data`) it also runs the "web" regime,
seed 0, on the device and compares it with the stored CPU figures in `results/real_images.json`.
Prints a table, writes `results/gpu_check.json`, exits 1 when a result does not match CPU within tolerance.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, machine, print_table, write_results

from reco_qdrant import Memory, RecoClassifier, TrainConfig, train_fusion
from reco_qdrant.evaluation import zero_shot_report
from reco_qdrant.memory import point_id
from reco_qdrant.synthetic import WorldConfig, make_world
from reco_qdrant.training import neighbour_cache, use_bf16

TOP1_TOL = 0.03  # bf16 training against fp32: a few test images may flip
PROBA_TOL = 1e-3  # same weights, fp32 inference on two devices


def device_info(device: str) -> dict:
    info = {"torch": torch.__version__, "device": device, **machine()}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        info |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                 "bf16": torch.cuda.is_bf16_supported()}
    return info


def synthetic(device: str, quick: bool, work: Path) -> tuple[list[dict], dict]:
    w = make_world(WorldConfig(seed=0, classes_per_super=8 if quick else 25))
    labels = np.searchsorted(w.eval_classes, w.eval_labels)
    names = [w.class_names[c] for c in w.eval_classes]
    epochs = 2 if quick else 30
    rows, models = [], {}
    with Memory.open(str(work / "memory")) as mem:
        mem.add_embeddings(w.memory_image, w.memory_text, w.memory_captions, ids=w.memory_ids, source="synthetic",
                           encoder_id="synthetic-world")
        ids = [point_id("synthetic", k) for k in w.train_ids]
        t0 = time.perf_counter()
        neighbour_cache(mem, w.train_image, "image", TrainConfig(cache_dir=str(work / "cold"), progress=False), ids)
        cache_s = time.perf_counter() - t0
        for dev, precision in ((device, "auto"), ("cpu", "fp32")):
            for agg in ("relevance", "transformer"):
                t0 = time.perf_counter()
                model = train_fusion(mem, w.train_image, w.train_text, labels=w.train_labels,
                                     class_embeddings=w.class_text, ids=ids, aggregator=agg, device=dev,
                                     precision=precision, epochs=epochs, seed=0, progress=False,
                                     cache_dir=str(work / "cache"))
                train_s = time.perf_counter() - t0
                clf = RecoClassifier(mem, model, gate="none").set_class_embeddings(  # the fusion alone, per device
                    w.class_text[w.eval_classes], names)
                t0 = time.perf_counter()
                res = zero_shot_report(clf, w.eval_image, labels)
                rows.append({"world": "synthetic", "aggregator": agg, "device": dev,
                             "bf16": use_bf16(precision, dev, w.cfg.dim), "top1": res["reco"]["top1"],
                             "baseline": res["baseline"]["top1"], "best epoch": model.best_epoch,
                             "train s": train_s, "predict s": time.perf_counter() - t0})
                models[(dev, agg)] = model
        # the same (CPU-trained) weights, inference on both devices
        proba = {}
        for dev in ("cpu", device):
            clf = RecoClassifier(mem, copy.deepcopy(models[("cpu", "relevance")]), device=dev)  # the default gate
            proba[dev] = clf.set_class_embeddings(w.class_text[w.eval_classes], names).predict_proba_embeddings(
                w.eval_image)
    checks = {"neighbour cache s (image queries, cold)": cache_s,
              "inference max |p_device - p_cpu|": float(np.abs(proba[device] - proba["cpu"]).max())}
    for agg in ("relevance", "transformer"):
        a, b = (next(r["top1"] for r in rows if r["aggregator"] == agg and r["device"] == d) for d in (device, "cpu"))
        checks[f"{agg}: top-1 device - cpu"] = a - b
    return rows, checks


def real_images(device: str, work: Path) -> tuple[list[dict], dict]:
    from real_images import VARIANTS, Setup, run
    from real_world import DATA, Towers, missing_data

    if missing_data(DATA):
        print(f"real images: skipped, no data under {DATA}", file=sys.stderr)
        return [], {}
    t0 = time.perf_counter()
    row = run(Setup("web", 0), Towers(device), work / "real", {c: VARIANTS[c] for c in ("RECO", "mean")})
    row["seconds"] = time.perf_counter() - t0
    stored = RESULTS / "real_images.json"
    cpu = next((r for r in json.loads(stored.read_text())["rows"] if (r["regime"], r["seed"]) == ("web", 0)), None)
    checks = {"real web RECO: top-1 device - cpu": row["RECO"] - cpu["RECO"]} if cpu else {}
    return [{"world": "real web, seed 0", "device": device, "top1": row["RECO"], "mean": row["mean"],
             "baseline": row["baseline"], "train s": row.get("RECO_train_s"), "seconds": row["seconds"]}], checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="a small world, 2 epochs, no real images (a dry run)")
    p.add_argument("--out", default="gpu_check")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "`--device cpu --quick` runs the script as a dry run", file=sys.stderr)
        return 2
    info = device_info(a.device)
    print(json.dumps(info))
    with tempfile.TemporaryDirectory() as tmp:
        rows, checks = synthetic(a.device, a.quick, Path(tmp))
        if not a.quick:
            more_rows, more = real_images(a.device, Path(tmp))
            rows, checks = rows + more_rows, checks | more
    ok = all(abs(v) <= (PROBA_TOL if "|p_" in k else TOP1_TOL) for k, v in checks.items() if "device" in k)
    print_table(rows, f"training and zero-shot on {a.device} and cpu")
    print_table([{"check": k, "value": v} for k, v in checks.items()],
                f"device against cpu (tolerance: top-1 {TOP1_TOL}, probabilities {PROBA_TOL}): "
                + ("MATCH" if ok else "MISMATCH"))
    write_results(a.out, {"machine": info, "rows": rows, "checks": checks, "match": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
