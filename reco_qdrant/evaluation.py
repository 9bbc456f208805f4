"""Zero-shot accuracy (baseline and RECO side by side) and image<->text retrieval recall@K."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .classifier import RecoClassifier
from .memory import validate_embeddings
from .sources import IMAGE_EXTS


def topk_accuracy(proba: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """proba [B, C], labels [B] (class indices) -> {"top1": ..., "top5": ...}."""
    order = np.argsort(-proba, axis=1)
    return {f"top{k}": float((order[:, : min(k, proba.shape[1])] == labels[:, None]).any(1).mean()) for k in ks}


def zero_shot_report(clf: RecoClassifier, image_embeddings: np.ndarray, labels: Sequence[int] | np.ndarray,
                     baseline: RecoClassifier | None = None) -> dict[str, Any]:
    """Top-1/top-5 of the plain CLIP baseline and of RECO, same prompts, same images.

    Args:
        clf: a RecoClassifier with classes set (its retrieval on).
        image_embeddings: [N, d]; labels: [N] indices into clf.classes_.
        baseline: the no-retrieval classifier; default: same classes, retrieval off.
    """
    labels = np.asarray(labels)
    if baseline is None:
        baseline = RecoClassifier(use_retrieval=False, fusion=clf.fusion, memory=clf.memory)
        baseline.set_class_embeddings(_raw_class_embeddings(clf), clf.classes_)
    base = topk_accuracy(baseline.predict_proba_embeddings(image_embeddings), labels)
    reco = topk_accuracy(clf.predict_proba_embeddings(image_embeddings), labels)
    return {"n_images": int(len(labels)), "n_classes": len(clf.classes_), "baseline": base, "reco": reco,
            "gain_top1": reco["top1"] - base["top1"]}


def _raw_class_embeddings(clf: RecoClassifier) -> np.ndarray:
    if getattr(clf, "raw_class_embeddings_", None) is None:
        raise ValueError("the classifier does not keep its unrefined class embeddings")
    return clf.raw_class_embeddings_


def recall_at_k(queries: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Row i of queries [N, d] should retrieve row i of targets [N, d] -> {"R@1": ...}.

    Inputs are L2-normalised first; a tie with another target counts against the query (a collapsed
    model whose outputs are all equal scores 0, not 1).
    """
    if len(queries) != len(targets):
        raise ValueError(f"recall_at_k: {len(queries)} queries but {len(targets)} targets; row i must pair with row i")
    q = validate_embeddings(queries, "queries", None, "recall_at_k")
    t = validate_embeddings(targets, "targets", q.shape[1], "recall_at_k")
    sims = q @ t.T
    own = sims[np.arange(len(sims)), np.arange(len(sims))][:, None]
    rank = (sims >= own).sum(1) - 1  # targets scoring at least as high as the right one, itself excluded
    return {f"R@{k}": float((rank < k).mean()) for k in ks}


def retrieval_report(clf: RecoClassifier, image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Image->text and text->image recall@K for paired embeddings, baseline and refined."""
    v = validate_embeddings(image_embeddings, "image embeddings", None, "retrieval_report")
    t = validate_embeddings(text_embeddings, "text embeddings", v.shape[1], "retrieval_report")
    vr, tr = clf.refine(v, "image"), clf.refine(t, "text")
    return {"n_pairs": int(len(v)),
            "baseline": {"image_to_text": recall_at_k(v, t, ks), "text_to_image": recall_at_k(t, v, ks)},
            "reco": {"image_to_text": recall_at_k(vr, tr, ks), "text_to_image": recall_at_k(tr, vr, ks)}}


def image_folder_dataset(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """An ImageFolder-style directory (root/<class name>/<image>) -> (paths, labels [N], class names)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder of images per class")
    paths, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                paths.append(f)
                labels.append(i)
    return paths, np.asarray(labels), [c.replace("_", " ") for c in classes]


def image_files(root: str | Path) -> list[Path]:
    """Every image file under `root` (recursively), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTS))}) found")
    return files
