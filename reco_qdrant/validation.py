"""Validation, which picks the best epoch: zero-shot accuracy on held-out classes, some absent from the memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .augment import _uncovered_held_out, _where_rows
from .clusters import _assign, medoids
from .fusion import FusionModel
from .memory import Memory
from .neighbour_cache import class_members, neighbour_cache, search_scores
from .prompts import _Prompts

if TYPE_CHECKING:
    from .pairs import _Pairs
    from .training import TrainConfig


class _Validation:
    """Zero-shot accuracy of held-out classes' images among *all* classes' prompts (as evaluation scores
    them), or, with neither labels nor pseudo-classes, image->text recall@1 on held-out pairs. `img_nb` and
    `target_nb` are the neighbour arrays (vectors, keys, mask) of the images and the targets; with `prompts`,
    the targets are its classes, as if absent where `absent` [C] is True, and each chunk of images is scored
    against prompts whose neighbours leave those images (`ids`) out. With `covered_nb`, also scored with every
    class present, and the two scores averaged."""

    CHUNK = 64
    ROWS = 1024  # images scored at a time against all targets

    def __init__(self, img: np.ndarray, img_nb: tuple, answer: np.ndarray, targets: np.ndarray | None = None,
                 target_nb: tuple | None = None, prompts: _Prompts | None = None, absent: np.ndarray | None = None,
                 ids: np.ndarray | None = None, seed: int = 0, covered_nb: tuple | None = None) -> None:
        self.img, self.img_nb, self.answer, self.covered_nb = img, img_nb, answer, covered_nb
        self.targets, self.target_nb, self.prompts, self.absent, self.ids = targets, target_nb, prompts, absent, ids
        self.order = np.random.default_rng(seed).permutation(len(img))  # chunks mix classes

    def score(self, model: FusionModel | None) -> float:
        """With `covered_nb` (the images' neighbours with every class present), the mean of the scores with the
        absent classes and with none: a memory may cover the classes asked about, or not."""
        if self.covered_nb is None or self.absent is None:
            return self._score(model, self.img_nb, self.absent)
        return 0.5 * (self._score(model, self.img_nb, self.absent) + self._score(model, self.covered_nb, None))

    def _score(self, model: FusionModel | None, img_nb: tuple, absent: np.ndarray | None) -> float:
        def refine(mod: str, q: np.ndarray, nb: tuple) -> np.ndarray:
            if model is None:
                return np.asarray(q, np.float32)
            return model.refine_numpy(mod, q, nb[0], nb[2], scores=search_scores(q, nb[1], nb[2]),
                                      searched=nb[1])[0]

        v = refine("image", self.img, img_nb)
        if self.prompts is None:  # rows at a time: [ROWS, N] scores, never [N, N] (161 GiB at 208k pairs)
            pred = _assign(v, refine("text", self.targets, self.target_nb), self.ROWS)
            return float((pred == self.answer).mean())
        chunks = [self.order] if self.ids is None else np.array_split(self.order, -(-len(v) // self.CHUNK))
        pred = np.empty(len(v), np.int64)
        for rows in chunks:
            nb = self.prompts.neighbours(absent, None if self.ids is None else self.ids[rows])
            pred[rows] = (v[rows] @ refine("text", self.prompts.emb, nb).T).argmax(1)
        return float((pred == self.answer).mean())


def _validation(memory: Memory, cfg: TrainConfig, p: _Pairs, rng: np.random.Generator) -> _Validation | None:
    """The validation of the held-out rows `p.va` (None without any): their classes' prompts, or without labels
    their pairs' texts; with coverage (`p.class_out`), a share of the held-out classes absent from the memory."""
    va = p.va
    sub = lambda nb: tuple(a[va] for a in nb)  # noqa: E731
    v_classes, v_emb, v_members = p.classes, p.class_embeddings, p.members
    # the held-out images' neighbours as if their class were absent ([len(va), k, ...])
    v_img_out = sub(p.img_out) if p.img_out is not None and not p.pseudo else None
    if p.pseudo:  # held-out clusters of the images, each with its medoid caption as prompt
        v_classes, v_emb = np.unique(p.v_labels), p.txt[medoids(p.txt, p.v_labels)]
        if p.class_out:  # whole image clusters are held out, so their members are all among the held-out rows
            v_members = class_members(p.ids, p.v_labels)
            v_img_out = neighbour_cache(memory, p.img[va], "image", cfg, [p.ids[i] for i in va],
                                        class_out=p.v_labels[va])
    if not len(va):
        return None
    if p.labels is None:
        return _Validation(p.img[va], sub(p.img_nb), np.arange(len(va)), p.txt[va], sub(p.txt_nb))
    prompts = _Prompts(memory, cfg, v_classes, v_emb, p.txt, p.v_labels, v_members, exclusion=p.ids is not None)
    val_nb, absent = sub(p.img_nb), None
    if p.class_out:
        out_classes = _uncovered_held_out(np.unique(p.v_labels[va]), cfg.uncovered_fraction, rng)
        absent = np.isin(v_classes, out_classes)
        val_nb = _where_rows(np.isin(p.v_labels[va], out_classes), v_img_out, val_nb)
    return _Validation(p.img[va], val_nb, np.searchsorted(v_classes, p.v_labels[va]), prompts=prompts, absent=absent,
                       ids=None if p.ids is None else np.asarray(p.ids)[va], seed=cfg.seed,
                       covered_nb=sub(p.img_nb) if p.pseudo else None)
