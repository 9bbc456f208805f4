"""The training pairs, prepared once before the first epoch: their (pseudo-)classes, validation split and neighbours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .clusters import medoids, pseudo_classes
from .memory import Memory
from .neighbour_cache import class_members, neighbour_cache

if TYPE_CHECKING:
    from .training import TrainConfig


@dataclass
class _Pairs:
    """The training pairs [N] and what training and validation read of them."""

    img: np.ndarray  # [N, d]
    txt: np.ndarray  # [N, d]
    labels: np.ndarray | None  # [N] class of each pair, or its pseudo-class (a cluster of the pairs)
    class_embeddings: np.ndarray | None  # [C, d] indexed by labels; for pseudo-classes, their medoid captions
    ids: list[str] | None  # [N] memory point ids of the pairs
    pseudo: bool = False  # whether `labels` are pseudo-classes
    v_labels: np.ndarray | None = None  # [N] the classes validation scores with (see `_pseudo_labels`)
    is_val: np.ndarray | None = None  # [N] bool, validation rows
    tr: np.ndarray | None = None  # training rows
    va: np.ndarray | None = None  # validation rows
    classes: np.ndarray | None = None  # the distinct labels
    class_out: bool = False  # coverage: classes are treated as absent from the memory (`_find_neighbours`)
    members: dict[int, frozenset[str]] | None = None  # with `class_out`: class -> the point ids of its pairs
    img_nb: tuple = ()  # (vectors [N, k, d], keys [N, k, d], mask [N, k]) of the image queries
    txt_nb: tuple = ()  # the same for the text queries
    img_out: tuple | None = None  # with `class_out`: img_nb as if each pair's class were absent from the memory
    txt_out: tuple | None = None  # the same for the text queries


def _prepare_pairs(img: np.ndarray, txt: np.ndarray, labels: np.ndarray | None, class_embeddings: np.ndarray | None,
                   ids: list[str] | None, cfg: TrainConfig, learns: bool, rng: np.random.Generator) -> _Pairs:
    """The pairs with their classes: the labels given, or without labels (and with enough pairs) pseudo-classes
    split for validation (`_pseudo_labels`), each with its medoid caption as prompt."""
    p = _Pairs(img, txt, labels, class_embeddings, ids)
    if labels is None and learns and cfg.pseudo_class_size > 0 and len(img) >= 8 * cfg.pseudo_class_size:
        p.labels, p.v_labels, p.is_val = _pseudo_labels(img, txt, cfg, rng)
        # None: near-duplicate pairs collapse into few clusters; validation is then on pairs instead
        p.pseudo = p.labels is not None
        if p.pseudo:
            p.class_embeddings = txt[medoids(txt, p.labels)]  # one caption, as a prompt is one sentence
    return p


def _find_neighbours(memory: Memory, p: _Pairs, cfg: TrainConfig, learns: bool, rng: np.random.Generator) -> None:
    """Fill in the pairs' neighbours (from the cache) and, where pseudo-classes did not, their validation split."""
    p.img_nb = neighbour_cache(memory, p.img, "image", cfg, p.ids)
    p.txt_nb = neighbour_cache(memory, p.txt, "text", cfg, p.ids)
    # Coverage: a memory never holds every class a user asks about. With labels and the pairs' point ids, a
    # share of classes is treated as absent (every point of the class excluded from its retrieval), in
    # training and in validation, so the model learns, and is selected for, knowing when retrieval misleads.
    p.class_out = learns and p.labels is not None and p.ids is not None and cfg.uncovered_fraction > 0
    if p.class_out:
        p.members = class_members(p.ids, p.labels)
        p.img_out = neighbour_cache(memory, p.img, "image", cfg, p.ids, class_out=p.labels)
        p.txt_out = neighbour_cache(memory, p.txt, "text", cfg, p.ids, class_out=p.labels)
    p.classes = np.unique(p.labels) if p.labels is not None else None
    if not p.pseudo:  # validation scores against the held-out classes (pseudo: see `_pseudo_labels`)
        p.v_labels, p.is_val = p.labels, _split(len(p.img), p.labels, cfg.val_fraction, rng)
    p.tr, p.va = np.flatnonzero(~p.is_val), np.flatnonzero(p.is_val)


def _split(n: int, labels: np.ndarray | None, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [n] mask of validation items: whole classes when labels are given."""
    if frac <= 0:
        return np.zeros(n, bool)
    if labels is not None:
        classes = np.unique(labels)
        if len(classes) < 4:
            raise ValueError(f"{len(classes)} classes: too few to hold some out for validation "
                             "(set val_fraction=0 to train without early stopping)")
        held = rng.choice(classes, max(2, int(round(len(classes) * frac))), replace=False)
        return np.isin(labels, held)
    return rng.random(n) < frac


def _pseudo_labels(img: np.ndarray, txt: np.ndarray, cfg: TrainConfig, rng: np.random.Generator
                   ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Without labels: (training clusters [N], validation clusters [N], validation rows [N] bool), or None for
    the first when the training pairs fall into fewer than 8 clusters.

    Validation holds out clusters of the *images*: visual concepts whose captions carry the memory's own
    noise. Training clusters the remaining *pairs* (image and text side by side), so that hiding a cluster
    hides the captions that name its concept along with its images, as a memory lacking a class does; pair
    clusters are not used for validation, because they gather captions that agree with their images and so
    overrate, on noisy captions, what training does for real prompts (docs/experiments.md). Training
    clusters and their medoid prompts come from training rows only; validation rows get classes of their own,
    so no validation caption serves as a training prompt."""
    v_labels = pseudo_classes(img, txt, cfg.pseudo_class_size, cfg.seed, on="image")
    if v_labels.max() + 1 < 8:
        return None, v_labels, np.zeros(len(img), bool)
    is_val = _split(len(img), v_labels, cfg.val_fraction, rng)
    tr = np.flatnonzero(~is_val)
    labels = np.empty(len(img), np.int64)
    labels[tr] = pseudo_classes(img[tr], txt[tr], cfg.pseudo_class_size, cfg.seed)
    if labels[tr].max() + 1 < 8:
        return None, v_labels, is_val
    labels[is_val] = labels[tr].max() + 1 + np.unique(v_labels[is_val], return_inverse=True)[1]
    return labels, v_labels, is_val
