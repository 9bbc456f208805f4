"""The demo: RECO on the synthetic world, end to end on a real memory, with the paper's ablations."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .classifier import RecoClassifier
from .evaluation import zero_shot_report
from .ingest import ingest
from .memory import Memory, point_id
from .sources import EmbeddingShards, write_embedding_shards
from .synthetic import WorldConfig, make_world
from .training import train_fusion

ABLATIONS = [  # (row name, train_fusion overrides); every model trains without labels
    ("RECO (uni-modal search, cross-modal fusion, relevance fusion)", {}),
    ("RECO untrained (its initialisation: the query plus both neighbour means)", dict(epochs=0)),
    ("RECO with the paper's fusion transformer", dict(aggregator="transformer")),
    ("cross-modal search, cross-modal fusion", dict(search="cross")),
    ("uni-modal search, uni-modal fusion", dict(fusion="uni")),
    ("mean fusion (nothing learned)", dict(aggregator="mean")),
    ("uni-modal mean fusion (nothing learned)", dict(aggregator="mean", fusion="uni")),
]


def run_demo(location: str | None = None, collection: str = "reco_demo", seed: int = 0,
             out_dir: str | Path = "reco-runs/demo", ablations: bool = True, progress: bool = True,
             world: WorldConfig | None = None) -> dict[str, Any]:
    """Build the synthetic world's memory, train the fusion without labels, compare with the baseline and the
    ablations on classes it never saw (zero-shot, RECO's protocol).

    Returns a dict with the accuracy table, training times, and a few queries with their
    retrieved captions; the RECO checkpoint is saved to `out_dir/fusion`.
    """
    w = make_world(world or WorldConfig(seed=seed))
    out_dir = Path(out_dir)
    with Memory.open(location, collection=collection) as mem:
        with tempfile.TemporaryDirectory() as tmp:
            write_embedding_shards(tmp, w.memory_image, w.memory_text, w.memory_captions,
                                   extra={"key": w.memory_ids, "label": [w.class_names[c] for c in w.memory_labels]})
            report = ingest(mem, EmbeddingShards(tmp, key_column="key", source="synthetic"),
                            encoder_id="synthetic-world", progress=progress)
        ids = [point_id("synthetic", k) for k in w.train_ids]
        names = [w.class_names[c] for c in w.eval_classes]
        labels = np.searchsorted(w.eval_classes, w.eval_labels)
        rows, fusion_reco = [], None
        for name, overrides in ABLATIONS if ablations else ABLATIONS[:1]:
            t0 = time.perf_counter()
            # RECO's protocol: unlabelled training pairs (ids only, for self-exclusion) of other classes
            model = train_fusion(mem, w.train_image, w.train_text, ids=ids, seed=seed, progress=progress,
                                 cache_dir=str(out_dir / "cache"), **overrides)
            seconds = time.perf_counter() - t0
            # RECO as the classifier scores it by default, then every fusion alone (the paper's ablations)
            gates = [("none", name)] if rows else [
                (None, "RECO, the default classifier (the fusion with mean fusion, coverage gate)"),
                ("none", name.replace("RECO (", "RECO's fusion alone (", 1))]
            for gate, row in gates:
                clf = RecoClassifier(mem, model, gate=gate).set_class_embeddings(w.class_text[w.eval_classes], names)
                res = zero_shot_report(clf, w.eval_image, labels)
                if gate is None:  # the default classifier: its checkpoint is saved and its examples shown
                    fusion_reco, clf_reco = model, clf
                    rows.append({"method": "baseline (no retrieval)", **res["baseline"], "train_s": 0.0, "epoch": 0})
                rows.append({"method": row, **res["reco"], "train_s": seconds, "epoch": model.best_epoch})
        fusion_reco.save_pretrained(out_dir / "fusion")
        shown = np.arange(0, len(labels), max(1, len(labels) // 3))[:3]  # three example images
        ex = clf_reco.explain(w.eval_image[shown], "image")
        base_pred = RecoClassifier(use_retrieval=False).set_class_embeddings(
            w.class_text[w.eval_classes], names).predict_embeddings(w.eval_image[shown])
        reco_pred = clf_reco.predict_embeddings(w.eval_image[shown])
        truth = [names[i] for i in labels[shown]]
        examples = [{"truth": truth[i], "baseline": base_pred[i], "reco": reco_pred[i],
                     "neighbours": [{"caption": c, "score": float(s)} for c, s in
                                    zip(ex.neighbours.captions[i][:5], ex.neighbours.scores[i][:5])]}
                    for i in range(len(truth))]
        return {"memory": mem.info(), "ingest": report.to_dict(), "table": rows, "examples": examples,
                "checkpoint": str(out_dir / "fusion"), "world": w.cfg.__dict__}


def export_demo(root: str | Path, seed: int = 0, world: WorldConfig | None = None) -> dict[str, str]:
    """Write the demo world as files a server flow can use (`reco demo --export ./data`).

    - `root/memory/`: the memory pairs, clip-retrieval layout (caption, key, label): what the compose
      `ingest` service ingests;
    - `root/train/`: the training pairs, same layout (their keys are memory keys where the pair is stored);
    - `root/eval.npz`: `image` [E, d] evaluation image embeddings, `label` [E] into `class_names`, and
      `class_text` [Ce, d] the class-name prompt embeddings: classes never seen in training.
    Refuses to write over an existing export (delete it first).
    """
    w = make_world(world or WorldConfig(seed=seed))
    root = Path(root)
    parts = {"memory": root / "memory", "train": root / "train", "eval": root / "eval.npz"}
    there = [str(p) for p in parts.values() if p.exists()]
    if there:
        raise FileExistsError(f"{', '.join(there)}: already there; delete to export again")
    write_embedding_shards(parts["memory"], w.memory_image, w.memory_text, w.memory_captions,
                           extra={"key": w.memory_ids, "label": [w.class_names[c] for c in w.memory_labels]})
    write_embedding_shards(parts["train"], w.train_image, w.train_text, [w.class_names[c] for c in w.train_labels],
                           extra={"key": w.train_ids, "label": [w.class_names[c] for c in w.train_labels]})
    np.savez(parts["eval"], image=w.eval_image, label=np.searchsorted(w.eval_classes, w.eval_labels),
             class_names=np.array([w.class_names[c] for c in w.eval_classes]), class_text=w.class_text[w.eval_classes])
    return {k: str(v) for k, v in parts.items()}
