"""Class prompts and their neighbours, refined by the model: what images are scored against, in training's class
loss and in validation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .augment import _Misalign, _refine_batch, _where_rows
from .fusion import FusionModel
from .memory import Memory
from .neighbors import retrieve

if TYPE_CHECKING:
    from .training import TrainConfig


class _Prompts:
    """One embedding per class [C, d] (its prompt, or without prompts its captions' mean) and its neighbours.

    With `exclusion`, each prompt keeps 2k neighbours, so that the images being scored can be left out of
    their prompts' neighbours (`neighbours(exclude=...)`): a training image is a point of the memory and
    would otherwise meet itself among the images its own class name retrieved, which a test image never does
    (how often it did: docs/experiments.md)."""

    def __init__(self, memory: Memory, cfg: TrainConfig, classes: np.ndarray, class_embeddings: np.ndarray | None,
                 txt: np.ndarray, labels: np.ndarray, members: dict[int, frozenset[str]] | None = None,
                 exclusion: bool = False) -> None:
        emb = (class_embeddings[classes] if class_embeddings is not None else
               np.stack([txt[labels == c].mean(0) for c in classes]))
        self.classes, self.k = classes, cfg.k
        self.emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
        depth = 2 * cfg.k if exclusion else cfg.k

        def search(exclude: list | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            nb = retrieve(memory, self.emb, "text", depth, cfg.search, cfg.fusion, with_searched_vectors=True,
                          with_payload=False, exclude_ids=exclude)
            return nb.vectors, nb.searched_vectors, nb.ids

        self.nb = search(None)
        # as if each class were absent from the memory (its members excluded)
        self.nb_out = search([members[int(c)] for c in classes]) if members is not None else None

    def neighbours(self, absent: np.ndarray | None = None, exclude: Any = None) -> tuple:
        """(vectors [C, k, d], keys [C, k, d], mask [C, k]): each class's first k neighbours, as if absent from
        the memory where `absent` [C] is True, leaving out the point ids in `exclude`."""
        vectors, keys, ids = self.nb
        if absent is not None and self.nb_out is not None and np.any(absent):
            vectors, keys, ids = _where_rows(np.asarray(absent), self.nb_out, self.nb)
        keep = ids != ""
        if exclude is not None and len(exclude):
            keep &= ~np.isin(ids, list(exclude))
        order = np.argsort(~keep, axis=1, kind="stable")[:, : self.k]  # kept ones first, in rank order
        return (np.take_along_axis(vectors, order[..., None], 1), np.take_along_axis(keys, order[..., None], 1),
                np.take_along_axis(keep, order, 1))

    def refined(self, model: FusionModel, absent: np.ndarray | None = None, misalign: _Misalign | None = None,
                exclude: Any = None) -> torch.Tensor:
        """The class embeddings refined by the model, a differentiable tensor [C, d], from `neighbours(absent,
        exclude)`; `misalign` misaligns the text modality (see `_Misalign`)."""
        q = torch.from_numpy(self.emb).to(model.device)
        nb = [torch.from_numpy(np.ascontiguousarray(a)).to(model.device) for a in self.neighbours(absent, exclude)]
        if misalign is not None:
            q, nb = misalign.misalign(q), misalign.neighbours(nb, "text")
        return _refine_batch(model, "text", q, *nb, 0.0)
