"""Retrieval for a batch of queries under a RECO mode (search x fusion), with self-exclusion.

search "uni": search the query's own modality (image query -> memory images); "cross": the other.
fusion "cross": return the other modality's vectors of the hits (image query -> their texts);
"uni": the same modality's. RECO is uni-modal search + cross-modal fusion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .memory import Memory, Neighbours, pad_neighbours

SEARCH_MODES = ("uni", "cross")
FUSION_MODES = ("cross", "uni")
_OTHER = {"image": "text", "text": "image"}


def mode_modalities(query_modality: str, search: str = "uni", fusion: str = "cross") -> tuple[str, str]:
    """(modality searched, modality returned) for a query of `query_modality`."""
    if query_modality not in _OTHER:
        raise ValueError(f"query modality must be 'image' or 'text', got {query_modality!r}")
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {SEARCH_MODES}, got {search!r}")
    if fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
    searched = query_modality if search == "uni" else _OTHER[query_modality]
    returned = _OTHER[query_modality] if fusion == "cross" else query_modality
    return searched, returned


def retrieve(
    memory: Memory,
    queries: np.ndarray,
    query_modality: str,
    k: int,
    search: str = "uni",
    fusion: str = "cross",
    exclude_ids: Sequence[str | None] | None = None,
    dedup_threshold: float | None = None,
    batch_size: int = 256,
) -> Neighbours:
    """k neighbours of each query [B, d] under the mode; vectors [B, k, d] of the returned modality.

    With `exclude_ids` (one point id per query, or None) and/or `dedup_threshold` (drop hits whose
    score in the searched modality is >= the threshold), a query never retrieves itself or its
    near-duplicates: hits are over-fetched and the list is filled up to k from further down the
    ranking; when fewer than k remain, the rest is padded (mask False).
    """
    searched, returned = mode_modalities(query_modality, search, fusion)
    if exclude_ids is None and dedup_threshold is None:
        return memory.search(queries, searched, k, returned, batch_size=batch_size)
    q = np.asarray(queries, np.float32)
    total = memory.count()
    fetch = min(total, k + max(8, k // 2))
    rows: list[tuple[list[str], list[float], list, list[dict]] | None] = [None] * len(q)
    todo = np.arange(len(q))
    while len(todo):
        nb = memory.search(q[todo], searched, fetch, returned, batch_size=batch_size)
        short = []
        for j, i in enumerate(todo):
            keep = nb.mask[j].copy()
            if exclude_ids is not None and exclude_ids[i] is not None:
                keep &= nb.ids[j] != exclude_ids[i]
            if dedup_threshold is not None:
                keep &= nb.scores[j] < dedup_threshold
            idx = np.flatnonzero(keep)[:k]
            if len(idx) < k and fetch < total:
                short.append(i)
                continue
            rows[i] = (nb.ids[j, idx].tolist(), nb.scores[j, idx].tolist(), nb.vectors[j, idx],
                       [nb.payloads[j][t] for t in idx])
        todo = np.asarray(short, dtype=int)
        fetch = min(total, fetch * 2)
    return pad_neighbours([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                          [r[3] for r in rows], k, q.shape[1])
