"""RECO on real images, end to end through the public API: baseline, RECO, the paper's ablations,
mean fusion and a training-free k-NN caption vote, in four regimes, several seeds.

    python benchmarks/real_images.py                       # 4 regimes x 3 seeds, ~30 min on 2 cores
    python benchmarks/real_images.py --regimes web --seeds 0
    python benchmarks/real_images.py --heads disjoint --regimes web noisy partial   # heads not fitted on the memory

The "CLIP" is two frozen pretrained towers (EfficientNet-Lite0, MiniLM) with linear heads trained
CLIP-style on web-like pairs (`real_world.py`). The memory is filled through the ingest API from the
image files and a captions table: CUB-100 train images with web captions (a share naming a wrong
species, a share naming none), plus Flowers-12 and COCO-MINI pairs as distractors.
Regimes: web (heads and fusion learn from all species; 100-way on the 2,903 test images); unseen
(they learn from 50 species; 50-way on the other 50); noisy (web, 45% wrong and 30% unnamed
captions); partial (the memory, and so the fusion's training pairs, hold half of the species; the
heads still learn all of them; 100-way). Needs ../shared/data; says so and exits 2 without it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from common import print_table, write_results
from real_world import (
    DATA,
    PROMPT,
    HeadsEncoder,
    Towers,
    coco_pairs,
    flowers_pairs,
    load_cub,
    missing_data,
    train_heads,
    web_captions,
)

from reco_qdrant import Memory, RecoClassifier, train_fusion
from reco_qdrant.evaluation import topk_accuracy, zero_shot_report
from reco_qdrant.ingest import ingest
from reco_qdrant.memory import point_id
from reco_qdrant.sources import ImageFolder

REGIMES = {  # captions wrong / unnamed; which species the heads+fusion learn; which the memory holds; eval
    "web": dict(wrong=0.15, unnamed=0.15, learn="all", memory="all", eval="all"),
    "unseen": dict(wrong=0.15, unnamed=0.15, learn="half", memory="all", eval="other"),
    "noisy": dict(wrong=0.45, unnamed=0.30, learn="all", memory="all", eval="all"),
    "partial": dict(wrong=0.15, unnamed=0.15, learn="all", memory="half", eval="all"),
}
VARIANTS = {  # column -> train_fusion overrides
    "RECO": {},  # the default: relevance fusion
    "paper transformer": dict(aggregator="transformer"),
    "cross-search": dict(search="cross"),
    "uni-fusion": dict(fusion="uni"),
    "mean": dict(aggregator="mean"),
}


@dataclass
class Setup:
    regime: str
    seed: int
    per_class: int | None = None  # cap on CUB images per species and split (tests); None = all
    distractors: int | None = None  # cap on Flowers and COCO pairs each (tests); None = all
    # "shared": the heads learn from the memory's own CUB pairs (the regimes above); "disjoint": from a random
    # half of the CUB training pairs, the memory holding (of its species) the other half, so the captions it
    # returns were never fitted by the encoder
    heads: str = "shared"

    def __post_init__(self) -> None:
        if self.heads not in ("shared", "disjoint"):
            raise ValueError(f"heads must be 'shared' or 'disjoint', got {self.heads!r}")


def knn_vote(mem: Memory, queries: np.ndarray, names: list[str], fallback: np.ndarray, k: int = 10) -> np.ndarray:
    """Training-free baseline: the class named most (score-weighted) by the captions of the k nearest
    memory images; `fallback` [B] where no caption names a class."""
    nb = mem.search(queries, "image", k, None)
    lowered = [n.lower() for n in names]
    pred = fallback.copy()
    for i, caps in enumerate(nb.captions):
        votes = np.zeros(len(names))
        for cap, s in zip(caps, nb.scores[i]):
            c = cap.lower()
            for j, n in enumerate(lowered):
                if n in c:
                    votes[j] += s
        if votes.any():
            pred[i] = int(votes.argmax())
    return pred


def run(setup: Setup, towers: Towers, work: Path, variants: dict = VARIANTS, data: Path = DATA,
        epochs: int | None = None) -> dict:
    """One regime and seed: heads, memory, fusion variants, evaluation. Returns top-1 per column."""
    spec = REGIMES[setup.regime]
    rng = np.random.default_rng(setup.seed)
    cub = load_cub(data)
    n_cls = len(cub.names)
    half = np.zeros(n_cls, bool)
    half[rng.permutation(n_cls)[: n_cls // 2]] = True
    keep = np.ones(len(cub.files), bool)
    if setup.per_class:
        for c in range(n_cls):
            for split in (True, False):
                idx = np.flatnonzero((cub.labels == c) & (cub.train == split))
                keep[idx[setup.per_class:]] = False
    tr = np.flatnonzero(cub.train & keep)
    te = np.flatnonzero(~cub.train & keep)
    captions = dict(zip(tr.tolist(), web_captions(cub.labels[tr], cub.names, spec["wrong"], spec["unnamed"],
                                                  setup.seed)))
    learn = tr[half[cub.labels[tr]]] if spec["learn"] == "half" else tr
    in_mem = tr[half[cub.labels[tr]]] if spec["memory"] == "half" else tr
    if setup.heads == "disjoint":
        heads_half = np.zeros(len(tr), bool)
        heads_half[rng.permutation(len(tr))[: len(tr) // 2]] = True
        learn, in_mem = learn[np.isin(learn, tr[heads_half])], in_mem[np.isin(in_mem, tr[~heads_half])]
    eval_cls = np.flatnonzero(~half) if spec["eval"] == "other" else np.arange(n_cls)
    te = te[np.isin(cub.labels[te], eval_cls)]
    (fl_root, fl_files, fl_caps), (co_root, co_files, co_caps) = (
        (root, files[: setup.distractors], caps[: setup.distractors]) for root, files, caps in (flowers_pairs(data),
                                                                                               coco_pairs(data)))

    def cub_paths(idx: np.ndarray) -> list[Path]:
        return [cub.root / "images" / cub.files[i] for i in idx]

    t0 = time.perf_counter()
    heads_img = np.concatenate([towers.images(cub_paths(learn)), towers.images([fl_root / f for f in fl_files]),
                                towers.images([co_root / f for f in co_files])])
    heads_txt = towers.texts([captions[i] for i in learn] + fl_caps + co_caps)
    enc = HeadsEncoder(towers, *train_heads(heads_img, heads_txt, seed=setup.seed),
                       f"{setup.regime}-s{setup.seed}" + ("-disjoint" if setup.heads == "disjoint" else ""))
    heads_s = time.perf_counter() - t0

    work.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name, files, caps in (("cub-web", [cub.files[i] for i in in_mem], [captions[i] for i in in_mem]),
                              ("flowers", fl_files, fl_caps), ("coco", co_files, co_caps)):
        tables[name] = work / f"{name}.parquet"
        pl.DataFrame({"file": files, "caption": caps}).write_parquet(tables[name])
    with Memory.open(str(work / "memory"), encoder=enc) as mem:
        for name, root in (("cub-web", cub.root / "images"), ("flowers", fl_root), ("coco", co_root)):
            ingest(mem, ImageFolder(root, tables[name], source=name), enc, progress=False)
        fit = in_mem[np.isin(cub.labels[in_mem], cub.labels[learn])]  # the memory's pairs of the species learned
        img, txt = enc.encode_images(cub_paths(fit)), enc.encode_texts([captions[i] for i in fit])
        ids = [point_id("cub-web", cub.files[i]) for i in fit]
        prompts = enc.encode_texts([PROMPT.format(n) for n in cub.names])
        test = enc.encode_images(cub_paths(te))
        labels = np.searchsorted(eval_cls, cub.labels[te])
        names = [cub.names[c] for c in eval_cls]
        row: dict = {"regime": setup.regime + ("/disjoint" if setup.heads == "disjoint" else ""), "seed": setup.seed,
                     "memory": mem.count(), "train_pairs": len(fit),
                     "test_images": len(te), "classes": len(eval_cls), "heads_s": round(heads_s, 1)}
        for col, over in variants.items():
            t0 = time.perf_counter()
            kw = {"epochs": epochs} if epochs is not None else {}
            model = train_fusion(mem, img, txt, labels=cub.labels[fit], class_embeddings=prompts, ids=ids,
                                 seed=setup.seed, progress=False, cache_dir=str(work / "cache"), **kw, **over)
            clf = RecoClassifier(mem, model).set_class_embeddings(prompts[eval_cls], names)
            res = zero_shot_report(clf, test, labels)
            seen = model.seen is not None and clf.fusion_used_ is model.seen  # weights for the classes trained on
            if clf.fusion_used_ is not model and not seen:  # the guard: these classes' names are unknown to the encoder
                row.setdefault("guard acted", []).append(f"{col}: {clf.scoring_}")
            if col == "RECO":
                row["alignment (classes / training)"] = f"{clf.alignment_:.2f} / {model.cfg.alignment:.2f}"
                row["baseline"] = res["baseline"]["top1"]
                row["RECO_train_s"] = round(time.perf_counter() - t0, 1)
                row["RECO_best_epoch"] = model.best_epoch
                row["RECO_weights"] = "seen (every labelled pair, full schedule)" if seen else "early-stopped"
                row["learned classes"] = f"{clf.learned_share_:.0%}"
                base_pred = np.asarray((test @ prompts[eval_cls].T).argmax(1))
            row[col] = res["reco"]["top1"]
        if "RECO" in variants:
            row["kNN vote"] = topk_accuracy(np.eye(len(eval_cls))[knn_vote(mem, test, names, base_pred)],
                                            labels, ks=(1,))["top1"]
    return row


COLUMNS = ["baseline", "RECO", "paper transformer", "cross-search", "uni-fusion", "mean", "kNN vote"]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread (min-max over seeds) per regime, in points."""
    out = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        rs = [r for r in rows if r["regime"] == regime]
        s = {"regime": regime, "seeds": len(rs)}
        for c in COLUMNS + ["RECO_train_s"]:
            v = np.array([r[c] for r in rs if c in r], float)
            if len(v):
                scale = 1 if c.endswith("_s") else 100
                s[c] = f"{scale * v.mean():.1f}" + (f" ±{scale * (v.max() - v.min()) / 2:.1f}" if len(v) > 1 else "")
        acted = sum(any(g.startswith("RECO:") for g in r.get("guard acted", [])) for r in rs)
        s["RECO guard acted"] = f"{acted}/{len(rs)} seeds"
        s["RECO seen weights"] = f"{sum(r.get('RECO_weights', '').startswith('seen') for r in rs)}/{len(rs)} seeds"
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--heads", choices=["shared", "disjoint"], default="shared",
                   help="disjoint: the heads learn from half of the CUB training pairs, the memory from the rest")
    p.add_argument("--out", default=None, help="results name (default real_images, or real_images_disjoint)")
    a = p.parse_args(argv)
    miss = missing_data(a.data)
    if miss:
        print(f"real_images: needs the CUB-100, Flowers-12 and COCO-MINI subsets under {a.data} "
              f"(see ../shared/data/README.md); missing: {', '.join(miss)}", file=sys.stderr)
        return 2
    towers = Towers()
    rows = []
    for regime in a.regimes:
        for seed in a.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                row = run(Setup(regime, seed, heads=a.heads), towers, Path(tmp), data=a.data)
            rows.append(row)
            print({k: (round(100 * v, 1) if k in COLUMNS else v) for k, v in row.items()}, flush=True)
    summary = summarise(rows)
    print_table(summary, "zero-shot top-1 on CUB test images (mean ±half-range over seeds)")
    out = a.out or ("real_images_disjoint" if a.heads == "disjoint" else "real_images")
    write_results(out, {"rows": rows, "summary": summary, "heads": a.heads,
                        "regimes": {r: REGIMES[r] for r in a.regimes}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
