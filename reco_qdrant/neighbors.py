"""Retrieval for a batch of queries under a RECO mode (search x fusion), with self-exclusion.

search "uni": search the query's own modality (image query -> memory images); "cross": the other.
fusion "cross": return the other modality's vectors of the hits (image query -> their texts);
"uni": the same modality's. RECO is uni-modal search + cross-modal fusion.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from ._deprecated import renamed_argument
from .memory import Memory, Neighbours

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
    exclude_ids: Sequence[str | Collection[str] | None] | None = None,
    dedup_threshold: float | None = None,
    batch_size: int = 256,
    with_payload: bool = True,
    with_searched_vectors: bool = False,
    with_vectors: bool = True,
    hnsw_ef: int | None = None,
    with_keys: bool | None = None,
) -> Neighbours:
    """k neighbours of each query [B, d] under the mode; vectors [B, k, d] of the returned modality.

    With `exclude_ids` (per query: a point id, a collection of ids, or None) and/or `dedup_threshold`, a query never
    retrieves itself or its near-duplicates: hits whose vector in the *query's* modality has cosine
    >= the threshold with the query are dropped (in cross-modal search that takes a uni-modal search
    of its own: there the hits' scores compare the query with the other modality, where its own pair
    scores ~0.3). Hits are over-fetched and the list is filled up to k from further down the ranking;
    when fewer than k remain, the rest is padded (mask False). `with_searched_vectors` also returns the
    hits' vectors in the searched modality (`Neighbours.searched_vectors`; `with_keys` is its deprecated name);
    `with_vectors=False` returns ids and scores only (the caller gathers vectors itself, e.g. from
    `Memory.vector_columns`).
    """
    with_searched_vectors = renamed_argument("with_keys", with_keys, "with_searched_vectors", with_searched_vectors,
                                             False)
    searched, returned = mode_modalities(query_modality, search, fusion)
    returned = returned if with_vectors else None
    if exclude_ids is None and dedup_threshold is None:
        return memory.search(queries, searched, k, returned, batch_size=batch_size, with_payload=with_payload,
                             with_searched_vectors=with_searched_vectors, hnsw_ef=hnsw_ef)
    q = np.asarray(queries, np.float32)
    if exclude_ids is not None and len(exclude_ids) != len(q):
        raise ValueError(f"{len(exclude_ids)} exclude_ids for {len(q)} queries")
    n, total = len(q), memory.count()
    given = list(exclude_ids) if exclude_ids is not None else [None] * n
    own = np.array([e if isinstance(e, str) else "" for e in given], dtype=object)
    score_dedup = dedup_threshold is not None and searched == query_modality
    banned = (memory.near_duplicate_sets(q, dedup_threshold, query_modality, batch_size=batch_size)
              if dedup_threshold is not None and not score_dedup else [set() for _ in range(n)])
    for b, e in zip(banned, given):
        if e is not None and not isinstance(e, str):
            b.update(e)
    banned = banned if any(banned) else None
    ids = np.full((n, k), "", dtype=object)
    scores = np.full((n, k), -np.inf, np.float32)
    vectors = np.zeros((n, k, q.shape[1]), np.float32) if returned else None
    searched_vectors = np.zeros((n, k, q.shape[1]), np.float32) if with_searched_vectors else None
    payloads: list[list[dict]] = [[{} for _ in range(k)] for _ in range(n)]
    fetch = min(total, k + max(8, k // 2))
    todo = np.arange(n)
    while len(todo):
        nb = memory.search(q[todo], searched, fetch, returned, batch_size=batch_size, with_payload=with_payload,
                           with_searched_vectors=with_searched_vectors, hnsw_ef=hnsw_ef)
        keep = nb.mask & (nb.ids != own[todo][:, None])  # (T, fetch)
        if score_dedup:
            keep &= nb.scores < dedup_threshold
        if banned is not None:
            for j, i in enumerate(todo):
                if banned[i]:
                    keep[j] &= ~np.isin(nb.ids[j], list(banned[i]))
        done = (keep.sum(1) >= k) | (fetch >= total)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept hits first, in rank order
        valid = np.take_along_axis(keep, order, 1)
        rows, sel, ok = todo[done], order[done], valid[done]
        ids[rows] = np.where(ok, np.take_along_axis(nb.ids[done], sel, 1), "")
        scores[rows] = np.where(ok, np.take_along_axis(nb.scores[done], sel, 1), -np.inf)
        for out, got in ((vectors, nb.vectors), (searched_vectors, nb.searched_vectors)):
            if out is not None:
                out[rows] = np.take_along_axis(got[done], sel[..., None], 1) * ok[..., None]
        if with_payload:
            for r, s_, o, j in zip(rows, sel, ok, np.flatnonzero(done)):
                payloads[r] = [nb.payloads[j][t] if v else {} for t, v in zip(s_, o)]
        todo = todo[~done]
        fetch = min(total, fetch * 2)
    return Neighbours(ids.astype(str), scores, vectors, payloads, searched_vectors)

