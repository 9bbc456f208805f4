"""RECO's zero-shot protocol on synthetic worlds: the fusion trains without labels on pairs of some classes and
is evaluated on classes it never saw, against the training-free alternatives, in three memories.

    python benchmarks/zero_shot_synthetic.py                         # dev and test worlds, 3 memories, ~10 min
    python benchmarks/zero_shot_synthetic.py --worlds dev --memories web
    python benchmarks/zero_shot_synthetic.py --sweep 1000 4000 16000 64000 256000 1000000   # against training-set size
    python benchmarks/zero_shot_synthetic.py --sweep 1000 4000 16000 64000 256000 1000000 --sweep-memory fixed

Worlds (`synthetic.py`): *dev* worlds (seeds 100-102, the default parameters, and the same seeds with an encoder
that knows every class name, if vaguely: `dev-known`) are where choices are made; *test* worlds (seeds 0-2 of
both, and a wider, noisier parameterisation) are reported only. Memories: web (15% of
captions name another class), noisy (50%), half absent (half of the evaluation classes missing from the
memory). Columns as in `real_images.py --protocol zero-shot`. The sweep varies the number of unlabelled
training pairs (pairs per training class) on one dev world and memory, and plots RECO's gain over mean fusion
(docs/zero_shot_data_size.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import GATED, RESULTS, gate_columns, print_table, write_results

from reco_qdrant import Memory, RecoClassifier, train_fusion
from reco_qdrant.evaluation import zero_shot_report
from reco_qdrant.memory import point_id
from reco_qdrant.synthetic import WorldConfig, make_world

WORLDS = {  # name -> (seeds, WorldConfig overrides)
    "dev": ((100, 101, 102), {}),
    "test": ((0, 1, 2), {}),
    "test-wide": ((0, 1, 2), dict(dim=128, n_superclasses=10, classes_per_super=20, image_noise=1.5,
                                  text_noise=1.4, rare_fraction=0.6)),
    # an encoder that knows every class name, if vaguely (the coverage gate's use): dev and test seeds
    "dev-known": ((100, 101, 102), dict(rare_fraction=0.0, prompt_noise=0.6)),
    "test-known": ((0, 1, 2), dict(rare_fraction=0.0, prompt_noise=0.6)),
}
MEMORIES = {"web": {}, "noisy": dict(mismatch_fraction=0.5), "half absent": {}}
VARIANTS = {
    "RECO": {},
    "RECO untrained": dict(epochs=0),
    "paper transformer": dict(aggregator="transformer"),
    "cross-search": dict(search="cross"),
    "uni-fusion": dict(fusion="uni"),
    "mean": dict(aggregator="mean"),
    "uni-mean": dict(aggregator="mean", fusion="uni"),
}
COLUMNS = ["baseline", *VARIANTS, *(f"{c}, no gate" for c in GATED)]


def run(world: str, seed: int, memory: str, variants: dict = VARIANTS, work: Path | None = None,
        gated: tuple[str, ...] = GATED, **world_over: object) -> dict:
    """One world, seed and memory: top-1 on the evaluation (new) classes for each column."""
    w = make_world(WorldConfig(seed=seed, **{**WORLDS[world][1], **MEMORIES[memory], **world_over}))
    keep = np.ones(len(w.memory_ids), bool)
    if memory == "half absent":
        absent = np.random.default_rng(seed).permutation(w.eval_classes)[: len(w.eval_classes) // 2]
        keep &= ~np.isin(w.memory_labels, absent)
    row: dict = {"world": world, "seed": seed, "memory": memory, "train_pairs": len(w.train_ids),
                 "memory_pairs": int(keep.sum())}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        with Memory.open(str(Path(tmp) / "memory")) as mem:
            idx = np.flatnonzero(keep)
            for s in range(0, len(idx), 50_000):
                rows = idx[s:s + 50_000]
                mem.add_embeddings(w.memory_image[rows], w.memory_text[rows], [w.memory_captions[i] for i in rows],
                                   ids=[w.memory_ids[i] for i in rows], source="synthetic", encoder_id="synthetic")
            # pairs not stored are simply not found; with none stored (a fixed memory) there is nothing to exclude
            ids = [point_id("synthetic", k) for k in w.train_ids] if w.cfg.train_in_memory_fraction > 0 else None
            names = [w.class_names[c] for c in w.eval_classes]
            labels = np.searchsorted(w.eval_classes, w.eval_labels)
            coverage = None
            for col, over in variants.items():
                t0 = time.perf_counter()
                model = train_fusion(mem, w.train_image, w.train_text, ids=ids, seed=seed, progress=False,
                                     cache_dir=str(Path(tmp) / "cache"), **over)
                row[f"{col} s"] = round(time.perf_counter() - t0, 1)  # training only
                for gate, name in gate_columns(col, gated):
                    clf = RecoClassifier(mem, model, gate=gate, coverage=coverage).set_class_embeddings(
                        w.class_text[w.eval_classes], names)
                    res = zero_shot_report(clf, w.eval_image, labels)
                    row["baseline"] = res["baseline"]["top1"]
                    row[name] = res["reco"]["top1"]
                    coverage = clf.coverage_ or coverage  # read once per memory
                row[f"{col} best_epoch"] = model.best_epoch
                row[f"{col} epochs"] = len(model.history) - 1  # epochs run (early stopping ends sooner)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["world"], r["memory"]) for r in rows):
        rs = [r for r in rows if (r["world"], r["memory"]) == key]
        s = {"world": key[0], "memory": key[1], "seeds": len(rs)}
        for c in COLUMNS:
            v = np.array([r[c] for r in rs if c in r], float)
            if len(v):
                s[c] = f"{100 * v.mean():.1f}" + (f" ±{100 * (v.max() - v.min()) / 2:.1f}" if len(v) > 1 else "")
        out.append(s)
    return out


SWEEPS = {  # sweep -> (results file, world overrides, label)
    "crowded": ("zero_shot_data_size", {}, "half of the training pairs also in the memory"),
    # the paper's setup: training pairs (CC12M there) are queries only, the memory (WebLI there) stays the same
    "fixed": ("zero_shot_data_size_fixed_memory", dict(train_in_memory_fraction=0.0),
              "training pairs not in the memory (fixed memory)"),
}


def sweep(sizes: list[int], seed: int = 100, memory: str = "web", kind: str = "crowded", on_row=None) -> list[dict]:
    """RECO and mean fusion against the number of unlabelled training pairs (104 training classes); `on_row(rows)`
    after each size, so that a long sweep keeps what it has measured."""
    rows = []
    for n in sizes:
        per_class = max(1, n // 100)
        r = run("dev", seed, memory, {k: VARIANTS[k] for k in ("RECO", "mean")}, gated=(), train_per_class=per_class,
                **SWEEPS[kind][1])
        r["sweep"] = kind
        r["gain over mean"] = r["RECO"] - r["mean"]
        rows.append(r)
        print({k: v for k, v in r.items()}, flush=True)
        if on_row:
            on_row(rows)
    return rows


def plot(path: Path) -> None:
    """Every sweep whose results are stored, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, _, label in SWEEPS.values():
        f = RESULTS / f"{name}.json"
        if f.exists():
            rows = json.loads(f.read_text())["rows"]
            ax.plot([r["train_pairs"] for r in rows], [100 * r["gain over mean"] for r in rows], "o-", label=label)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("unlabelled training pairs (104 training classes)")
    ax.set_ylabel("RECO - mean fusion (top-1 points)")
    ax.set_title("new classes, synthetic dev world 100, web memory", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    p.add_argument("--memories", nargs="+", default=list(MEMORIES), choices=list(MEMORIES))
    p.add_argument("--sweep", nargs="+", type=int, default=None, help="training-set sizes (pairs) to sweep instead")
    p.add_argument("--sweep-memory", choices=list(SWEEPS), default="crowded",
                   help="crowded: half of the training pairs also in the memory; fixed: the memory stays the same")
    a = p.parse_args(argv)
    if a.sweep:
        name = SWEEPS[a.sweep_memory][0]
        path = RESULTS / f"{name}.json"
        stored = json.loads(path.read_text()) if path.exists() else {}

        def keep(rows: list[dict]) -> None:  # merged with the stored sizes, so a rerun of one size keeps the rest
            new = {r["train_pairs"]: r for r in rows}
            old = [r for r in stored.get("rows", []) if r["train_pairs"] not in new]
            merged = sorted([*old, *new.values()], key=lambda r: r["train_pairs"])
            write_results(name, {**{k: v for k, v in stored.items() if k not in ("machine", "rows")}, "rows": merged})
            plot(Path(__file__).resolve().parents[1] / "docs" / "zero_shot_data_size.png")

        rows = sweep(a.sweep, kind=a.sweep_memory, on_row=keep)
        print_table([{k: r[k] for k in ("train_pairs", "RECO", "mean", "gain over mean", "RECO best_epoch",
                                        "RECO epochs", "RECO s")}
                     for r in rows], "new classes against unlabelled training pairs (dev world 100, web memory)")
        return 0
    rows = []
    for world in a.worlds:
        for memory in a.memories:
            for seed in WORLDS[world][0]:
                rows.append(run(world, seed, memory))
                print({k: (round(100 * v, 1) if k in COLUMNS else v) for k, v in rows[-1].items()}, flush=True)
    summary = summarise(rows)
    print_table(summary, "zero-shot top-1 on new classes, fusion trained without labels (mean ±half-range)")
    write_results("zero_shot_synthetic", {"rows": rows, "summary": summary, "worlds": {
        k: {"seeds": v[0], "overrides": v[1]} for k, v in WORLDS.items()}, "memories": MEMORIES})
    return 0


if __name__ == "__main__":
    sys.exit(main())
