"""RECO on real images, end to end through the public API, in two protocols.

    python benchmarks/real_images.py                                  # zero-shot: 3 memories x 3 seeds
    python benchmarks/real_images.py --memories web --seeds 0 --groups dev
    python benchmarks/real_images.py --protocol adaptation            # 4 regimes x 3 seeds, ~30 min on 2 cores
    python benchmarks/real_images.py --protocol adaptation --heads disjoint --regimes web noisy partial

The "CLIP" is two frozen pretrained towers (EfficientNet-Lite0, MiniLM) with linear heads trained
CLIP-style on web-like pairs (`real_world.py`). The memory is filled through the ingest API from the
image files and a captions table: CUB-100 train images with web captions (a share naming a wrong
species, a share naming none), plus Flowers-12 and COCO-MINI pairs as distractors.

**Zero-shot** (RECO's own promise, the headline): the heads learn from web pairs of every species (a
web-trained CLIP knows every name); the species are split by seed into 50 fusion-training, 25 dev and 25
test species; the fusion trains *without labels* on the memory's pairs of the training species plus the
Flowers and COCO pairs (ids only, for self-exclusion), and is evaluated 25-way on the dev species (where
every choice is made) and on the test species (reported only). Memories: web captions (15% wrong, 15%
unnamed), noisy (45% / 30%), half absent (half of each species group missing from the memory).

**Adaptation** (a separate feature): the fusion trains with the labels and prompts of the species it is
evaluated on and is scored with its adapted weights (`RecoClassifier(weights="adapted")`). Regimes: web
(heads and fusion learn from all species; 100-way on the 2,903 test images); unseen (they learn from 50
species; 50-way on the other 50, zero-shot weights); noisy (web, 45% wrong and 30% unnamed captions);
partial (the memory, and so the fusion's training pairs, hold half of the species; the heads still learn
all of them; 100-way). Needs ../shared/data; says so and exits 2 without it.
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
from common import GATED, gate_columns, print_table, write_results
from real_world import (
    DATA,
    PROMPT,
    Cub,
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


def fill_memory(mem: Memory, enc: HeadsEncoder, work: Path, cub: Cub, in_mem: np.ndarray, captions: dict,
                flowers: tuple, coco: tuple) -> None:
    """Ingest, through the image-folder API, the CUB pairs `in_mem` (with their web captions) and the
    Flowers and COCO pairs ((folder, files, captions) each), from caption tables written under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    parts = (("cub-web", cub.root / "images", [cub.files[i] for i in in_mem], [captions[i] for i in in_mem]),
             ("flowers", *flowers), ("coco", *coco))
    for name, root, files, caps in parts:
        table = work / f"{name}.parquet"
        pl.DataFrame({"file": files, "caption": caps}).write_parquet(table)
        ingest(mem, ImageFolder(root, table, source=name), enc, progress=False)


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

    with Memory.open(str(work / "memory"), encoder=enc) as mem:
        fill_memory(mem, enc, work, cub, in_mem, captions, (fl_root, fl_files, fl_caps), (co_root, co_files, co_caps))
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
            # adaptation: the weights adapted to the species trained on, where those are the species evaluated
            adapted = model.adapted is not None and spec["eval"] != "other"
            clf = RecoClassifier(mem, model, weights="adapted" if adapted else "zero-shot", gate="none")  # the fusion
            res = zero_shot_report(clf.set_class_embeddings(prompts[eval_cls], names), test, labels)
            if col == "RECO":
                row["baseline"] = res["baseline"]["top1"]
                row["RECO_train_s"] = round(time.perf_counter() - t0, 1)
                row["RECO_best_epoch"] = model.best_epoch
                row["RECO_weights"] = clf.weights
                base_pred = np.asarray((test @ prompts[eval_cls].T).argmax(1))
            row[col] = res["reco"]["top1"]
        if "RECO" in variants:
            row["kNN vote"] = topk_accuracy(np.eye(len(eval_cls))[knn_vote(mem, test, names, base_pred)],
                                            labels, ks=(1,))["top1"]
    return row


ZERO_SHOT_MEMORIES = {  # captions wrong / unnamed; share of each species group absent from the memory
    "web": dict(wrong=0.15, unnamed=0.15, absent=0.0),
    "noisy": dict(wrong=0.45, unnamed=0.30, absent=0.0),
    "half absent": dict(wrong=0.15, unnamed=0.15, absent=0.5),
}
ZERO_SHOT_VARIANTS = {  # column -> train_fusion overrides; every model trains without labels
    "RECO": {},
    "RECO untrained": dict(epochs=0),
    "paper transformer": dict(aggregator="transformer"),
    "cross-search": dict(search="cross"),
    "uni-fusion": dict(fusion="uni"),
    "mean": dict(aggregator="mean"),
    "uni-mean": dict(aggregator="mean", fusion="uni"),
}
SPLIT = (50, 25, 25)  # species: fusion-training, dev, test


def species_split(n_cls: int, seed: int) -> dict[str, np.ndarray]:
    """The species, split by seed into the fusion's training species, dev species (every choice is made on
    them) and test species (reported only)."""
    perm = np.random.default_rng(seed).permutation(n_cls)
    a, b = SPLIT[0] * n_cls // 100, (SPLIT[0] + SPLIT[1]) * n_cls // 100
    return {"train": np.sort(perm[:a]), "dev": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def run_zero_shot(memory_kind: str, seed: int, towers: Towers, work: Path, variants: dict = ZERO_SHOT_VARIANTS,
                  data: Path = DATA, per_class: int | None = None, distractors: int | None = None,
                  epochs: int | None = None, groups: tuple[str, ...] = ("dev", "test")) -> dict:
    """RECO's own protocol: the "CLIP" heads learn from web pairs of every species; the fusion trains on
    unlabelled pairs (the memory's pairs of the training species, Flowers and COCO; ids only, for
    self-exclusion); evaluation is zero-shot among the dev species and, separately, the test species, which
    the fusion never saw. Returns top-1 per group and column."""
    spec = ZERO_SHOT_MEMORIES[memory_kind]
    rng = np.random.default_rng(seed)
    cub = load_cub(data)
    n_cls = len(cub.names)
    split = species_split(n_cls, seed)
    keep = np.ones(len(cub.files), bool)
    if per_class:
        for c in range(n_cls):
            for part in (True, False):
                keep[np.flatnonzero((cub.labels == c) & (cub.train == part))[per_class:]] = False
    tr = np.flatnonzero(cub.train & keep)
    te = np.flatnonzero(~cub.train & keep)
    captions = dict(zip(tr.tolist(), web_captions(cub.labels[tr], cub.names, spec["wrong"], spec["unnamed"], seed)))
    absent = np.concatenate([rng.permutation(g)[: int(round(len(g) * spec["absent"]))] for g in split.values()])
    in_mem = tr[~np.isin(cub.labels[tr], absent)]
    (fl_root, fl_files, fl_caps), (co_root, co_files, co_caps) = (
        (root, files[:distractors], caps[:distractors])
        for root, files, caps in (flowers_pairs(data), coco_pairs(data)))

    def cub_paths(idx: np.ndarray) -> list[Path]:
        return [cub.root / "images" / cub.files[i] for i in idx]

    t0 = time.perf_counter()
    heads_img = np.concatenate([towers.images(cub_paths(tr)), towers.images([fl_root / f for f in fl_files]),
                                towers.images([co_root / f for f in co_files])])
    heads_txt = towers.texts([captions[i] for i in tr] + fl_caps + co_caps)
    enc = HeadsEncoder(towers, *train_heads(heads_img, heads_txt, seed=seed), f"zs-{memory_kind}-s{seed}")
    heads_s = time.perf_counter() - t0
    with Memory.open(str(work / "memory"), encoder=enc) as mem:
        fill_memory(mem, enc, work, cub, in_mem, captions, (fl_root, fl_files, fl_caps), (co_root, co_files, co_caps))
        fit = in_mem[np.isin(cub.labels[in_mem], split["train"])]
        img = np.concatenate([enc.encode_images(cub_paths(fit)), enc.encode_images([fl_root / f for f in fl_files]),
                              enc.encode_images([co_root / f for f in co_files])])
        txt = enc.encode_texts([captions[i] for i in fit] + fl_caps + co_caps)
        ids = ([point_id("cub-web", cub.files[i]) for i in fit] + [point_id("flowers", f) for f in fl_files]
               + [point_id("coco", f) for f in co_files])
        prompts = enc.encode_texts([PROMPT.format(n) for n in cub.names])
        evals = {}
        for g in groups:
            idx = te[np.isin(cub.labels[te], split[g])]
            evals[g] = (enc.encode_images(cub_paths(idx)), np.searchsorted(split[g], cub.labels[idx]), split[g])
        row: dict = {"memory kind": memory_kind, "seed": seed, "memory": mem.count(), "train_pairs": len(fit) + len(
            fl_files) + len(co_files), "heads_s": round(heads_s, 1),
            "absent species": int(len(absent))}
        for g, (test, labels, cls) in evals.items():
            row[f"{g} images"] = len(labels)
            base = (test @ prompts[cls].T).argmax(1)
            row[f"{g}/baseline"] = float((base == labels).mean())
            names = [cub.names[c] for c in cls]
            row[f"{g}/kNN vote"] = float((knn_vote(mem, test, names, base) == labels).mean())
        coverage = None
        for col, over in variants.items():
            t0 = time.perf_counter()
            kw = {"epochs": epochs} if epochs is not None and "epochs" not in over else {}
            model = train_fusion(mem, img, txt, ids=ids, seed=seed, progress=False, cache_dir=str(work / "cache"),
                                 **kw, **over)
            row[f"{col} train_s"] = round(time.perf_counter() - t0, 1)
            row[f"{col} best_epoch"] = model.best_epoch
            for g, (test, labels, cls) in evals.items():
                for gate, name in gate_columns(col):
                    clf = RecoClassifier(mem, model, gate=gate, coverage=coverage).set_class_embeddings(
                        prompts[cls], [cub.names[c] for c in cls])
                    row[f"{g}/{name}"] = zero_shot_report(clf, test, labels)["reco"]["top1"]
                    coverage = clf.coverage_ or coverage  # read once per memory
    return row


ZERO_SHOT_COLUMNS = ["baseline", *ZERO_SHOT_VARIANTS, *(f"{c}, no gate" for c in GATED), "kNN vote"]


def summarise_zero_shot(rows: list[dict], group: str) -> list[dict]:
    """Mean and half-range over seeds per memory, in points, for one species group."""
    out = []
    for kind in dict.fromkeys(r["memory kind"] for r in rows):
        rs = [r for r in rows if r["memory kind"] == kind]
        s = {"memory": kind, "seeds": len(rs)}
        for c in ZERO_SHOT_COLUMNS:
            v = np.array([r[f"{group}/{c}"] for r in rs if f"{group}/{c}" in r], float)
            if len(v):
                s[c] = f"{100 * v.mean():.1f}" + (f" ±{100 * (v.max() - v.min()) / 2:.1f}" if len(v) > 1 else "")
        out.append(s)
    return out


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
        s["RECO weights"] = "/".join(sorted({r.get("RECO_weights", "-") for r in rs}))
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=["zero-shot", "adaptation"], default="zero-shot",
                   help="zero-shot (default): the fusion trains without labels on other species than it is "
                        "evaluated on; adaptation: trained with the labels and prompts of the species evaluated")
    p.add_argument("--memories", nargs="+", default=list(ZERO_SHOT_MEMORIES), choices=list(ZERO_SHOT_MEMORIES),
                   help="zero-shot: which memories")
    p.add_argument("--regimes", nargs="+", default=None, choices=list(REGIMES), help="adaptation: regimes (all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--groups", nargs="+", default=["dev", "test"], choices=["dev", "test"],
                   help="zero-shot: species groups evaluated (choose on dev; report test)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--heads", choices=["shared", "disjoint"], default=None,
                   help="adaptation: disjoint: the heads learn from half of the CUB training pairs, the memory "
                        "from the rest")
    p.add_argument("--out", default=None, help="results name (default real_images_zero_shot, real_images, or "
                                               "real_images_disjoint)")
    a = p.parse_args(argv)
    if a.protocol == "zero-shot" and (a.regimes or a.heads):
        p.error("--regimes and --heads belong to --protocol adaptation")
    a.regimes, a.heads = a.regimes or list(REGIMES), a.heads or "shared"
    miss = missing_data(a.data)
    if miss:
        print(f"real_images: needs the CUB-100, Flowers-12 and COCO-MINI subsets under {a.data} "
              f"(see ../shared/data/README.md); missing: {', '.join(miss)}", file=sys.stderr)
        return 2
    towers = Towers()
    rows = []
    if a.protocol == "zero-shot":
        for kind in a.memories:
            for seed in a.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    row = run_zero_shot(kind, seed, towers, Path(tmp), data=a.data, groups=tuple(a.groups))
                rows.append(row)
                print({k: (round(100 * v, 1) if isinstance(v, float) and "/" in k else v) for k, v in row.items()},
                      flush=True)
        summary = {g: summarise_zero_shot(rows, g) for g in a.groups}
        for g, table in summary.items():
            print_table(table, f"zero-shot top-1 on the {g} species' CUB test images, fusion trained without labels "
                               "on other species (mean ±half-range over seeds)")
        write_results(a.out or "real_images_zero_shot", {"protocol": "zero-shot", "rows": rows, "summary": summary,
                                                          "split": SPLIT,
                                                          "memories": {m: ZERO_SHOT_MEMORIES[m] for m in a.memories}})
        return 0
    for regime in a.regimes:
        for seed in a.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                row = run(Setup(regime, seed, heads=a.heads), towers, Path(tmp), data=a.data)
            rows.append(row)
            print({k: (round(100 * v, 1) if k in COLUMNS else v) for k, v in row.items()}, flush=True)
    summary = summarise(rows)
    print_table(summary, "adaptation: top-1 on CUB test images, the fusion trained with the labels and prompts of "
                         "the species evaluated (mean ±half-range over seeds)")
    out = a.out or ("real_images_disjoint" if a.heads == "disjoint" else "real_images")
    write_results(out, {"protocol": "adaptation", "rows": rows, "summary": summary, "heads": a.heads,
                        "regimes": {r: REGIMES[r] for r in a.regimes}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
