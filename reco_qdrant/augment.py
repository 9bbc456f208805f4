"""The training augmentations, each on the share of the data its `TrainConfig` fraction sets: swapped neighbours
(`swap_fraction`), uncovered classes (`uncovered_fraction`) and a misaligned world (`misaligned_fraction`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .fusion import FusionModel
from .neighbors import mode_modalities
from .neighbour_cache import search_scores

if TYPE_CHECKING:
    from .training import TrainConfig


def _refine_batch(model: FusionModel, modality: str, q: torch.Tensor, vectors: torch.Tensor, keys: torch.Tensor,
                  mask: torch.Tensor, swap_fraction: float) -> torch.Tensor:
    """Refine a training batch. A share of the queries is handed another query's neighbours, scored against
    itself: a memory never covers every class, and the model must learn when retrieval has nothing to offer."""
    vectors, keys = vectors.float(), keys.float()
    if swap_fraction > 0:
        rows = torch.nonzero(torch.rand(len(q), device=q.device) < swap_fraction).flatten()
        if len(rows) > 1:
            donors = rows.roll(1)
            vectors, keys, mask = vectors.clone(), keys.clone(), mask.clone()
            vectors[rows], keys[rows], mask[rows] = vectors[donors], keys[donors], mask[donors]
    return model.refine(modality, q, vectors, mask, scores=search_scores(q, keys, mask), searched=keys)[0]


def _where_rows(rows: Any, a: Any, b: Any) -> list:
    """Neighbour arrays (vectors, keys, mask) taken from `a` where rows [N] is True, else from `b`
    (numpy arrays or torch tensors, as given)."""
    where = torch.where if isinstance(rows, torch.Tensor) else np.where
    return [where(rows.reshape(-1, *[1] * (x.ndim - 1)), x, y) for x, y in zip(a, b)]


def _uncover(classes: np.ndarray, batch_labels: np.ndarray, fraction: float, neighbours: list[tuple[list, list]],
             device: Any) -> tuple[torch.Tensor, list[list]]:
    """This training step's uncovered classes: a share `fraction` of `classes` [C] is treated as absent from the
    memory, so the batch's queries of those classes (labels [B]) take the neighbours they retrieve without their
    class. `neighbours`: per modality, (covered, uncovered) neighbour tensors of the batch.
    Returns the absent classes [C] bool and the neighbours per modality."""
    absent = torch.rand(len(classes)) < fraction
    rows = absent[np.searchsorted(classes, batch_labels)].to(device)
    return absent, [_where_rows(rows, uncovered, covered) for covered, uncovered in neighbours]


def _uncovered_held_out(held: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The held-out classes that validation treats as absent from the memory: a share `fraction` of `held`."""
    return rng.choice(held, int(round(len(held) * fraction)), replace=False)


class _Misalign:
    """An encoder that does not align the modalities, simulated: every text vector of a training step
    (queries, neighbours, prompts) is turned by one random orthogonal map, mixed with the identity by a
    random angle. Image-image cosines are kept and text-text ones nearly, so the search scores hold, while
    image-text ones are scrambled: the case of classes whose names the encoder never learned, where only
    retrieval (an image's neighbours' captions, a name's captions' images) tells the classes apart
    (what it gives on real images: docs/experiments.md)."""

    def __init__(self, cfg: TrainConfig, dim: int, device: Any) -> None:
        self.cfg = cfg
        rot, _ = torch.linalg.qr(torch.randn(dim, dim))
        angle = float(torch.rand(())) * math.pi / 2
        self.map = (math.cos(angle) * torch.eye(dim) + math.sin(angle) * rot).to(device)

    def misalign(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.float() @ self.map, dim=-1)

    def neighbours(self, nb: list | None, query_modality: str) -> list | None:
        """(vectors, keys, mask) of `query_modality` queries with their text vectors turned."""
        if nb is None:
            return None
        searched, returned = mode_modalities(query_modality, self.cfg.search, self.cfg.fusion)
        vectors, keys, mask = nb
        return [self.misalign(vectors) if returned == "text" else vectors,
                self.misalign(keys) if searched == "text" else keys, mask]


def _misaligned(cfg: TrainConfig, dim: int, device: Any) -> _Misalign | None:
    """This training step's misaligned world (on a share `misaligned_fraction` of the steps), else None."""
    return _Misalign(cfg, dim, device) if torch.rand(()) < cfg.misaligned_fraction else None
