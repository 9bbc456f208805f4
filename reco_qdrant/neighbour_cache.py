"""The training queries' neighbours: searched once, kept on disk under a key of what they depend on, read per batch."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import durable
from .ingest import cache_root as package_cache_root
from .memory import Memory
from .neighbors import mode_modalities, retrieve
from .progress import progress_bar

if TYPE_CHECKING:
    from .training import TrainConfig


def _digest(*parts: Any) -> str:
    """A short key of arrays (their bytes) and other values (their repr)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return h.hexdigest()[:20]


def cache_root(cfg: TrainConfig) -> Path:
    """Where neighbour caches live: `cache_dir`, else beside the run (`out_dir/cache`), else the package's one
    cache directory (`ingest.cache_root`: $RECO_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /reco_qdrant)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir) / "neighbours"
    if cfg.out_dir:
        return Path(cfg.out_dir) / "cache" / "neighbours"
    if os.environ.get("RECO_CACHE") and not os.environ.get("RECO_CACHE_DIR"):
        warnings.warn("$RECO_CACHE is deprecated and will be ignored in the next release: set $RECO_CACHE_DIR, the "
                      "one cache directory for embeddings and neighbours", DeprecationWarning, stacklevel=3)
        return Path(os.environ["RECO_CACHE"]) / "neighbours"
    return package_cache_root() / "neighbours"


def _prune_cache(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used caches in `root`. Another process may prune (or write) the
    same folder meanwhile: a cache that is gone by the time it is looked at is simply not counted."""
    stamped = []
    for p in root.glob("*.vectors.npy"):
        try:
            stamped.append((p.stat().st_mtime, p))
        except FileNotFoundError:  # removed by a concurrent prune between the listing and the stat
            continue
    entries = [p for _, p in sorted(stamped, key=lambda e: e[0], reverse=True)]
    for old in entries[max(keep, 0):]:
        key = old.name.removesuffix(".vectors.npy")
        for p in (old, root / f"{key}.keys.npy", root / f"{key}.mask.npy"):
            p.unlink(missing_ok=True)


def neighbour_cache(memory: Memory, queries: np.ndarray, query_modality: str, cfg: TrainConfig,
                    ids: list[str | None] | None, class_out: np.ndarray | None = None,
                    columns: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query [N, d]: neighbour vectors [N, k, d] of the fused modality, their keys [N, k, d]
    (vectors of the searched modality; float16, memory-mapped) and mask [N, k]. Cached on disk under a
    key of the memory's id and write version (it changes with every upsert and delete), the mode and
    the queries.

    With `class_out` (labels [N] of the queries, whose `ids` are memory points), each query retrieves as
    if its class were absent from the memory: every point of its class is excluded.

    `columns`: search for ids only and gather the hits' vectors by id from `Memory.vector_columns` (the
    memory's vector copy, or one written by a scroll), instead of receiving them with every hit; default:
    when the queries' hits outnumber the memory's points (what reading every point once costs is repaid)."""
    root = cache_root(cfg)
    key = _digest(memory.uid, memory.write_version, cfg.k, cfg.search, cfg.fusion, query_modality,
                  cfg.self_exclusion, cfg.dedup_threshold, cfg.hnsw_ef, ids, queries, class_out)
    exclude = ids if cfg.self_exclusion else None
    if class_out is not None:
        members = class_members(ids, class_out)
        exclude = [members[c] for c in class_out]
    paths = {p: root / f"{key}.{p}.npy" for p in ("vectors", "keys", "mask")}
    searched, returned = mode_modalities(query_modality, cfg.search, cfg.fusion)
    if all(p.exists() for p in paths.values()):
        try:
            os.utime(paths["vectors"])  # recently used: pruned last
            return (np.load(paths["vectors"], mmap_mode="r"), np.load(paths["keys"], mmap_mode="r"),
                    np.load(paths["mask"]))
        except FileNotFoundError:  # pruned by another process meanwhile: computed again below
            pass
    root.mkdir(parents=True, exist_ok=True)
    n, d = queries.shape
    tmp = {p: root / f"{key}.{os.getpid()}.{p}.tmp.npy" for p in ("vectors", "keys")}
    tmp_mask = root / f"{key}.{os.getpid()}.mask.tmp.npy"
    try:  # a failure or Ctrl-C leaves none of this run's temporary files behind
        vecs, keys = (np.lib.format.open_memmap(tmp[p], mode="w+", dtype=np.float16, shape=(n, cfg.k, d))
                      for p in ("vectors", "keys"))
        mask = np.zeros((n, cfg.k), bool)
        if columns is None:
            columns = n * cfg.k > memory.count()
        columns = memory.vector_columns(root / "columns", cfg.progress) if columns else None
        step = 1024
        with progress_bar(f"neighbours ({query_modality} queries)", n, cfg.progress) as advance:
            for s in range(0, n, step):
                e = min(n, s + step)
                nb = retrieve(memory, queries[s:e], query_modality, cfg.k, cfg.search, cfg.fusion,
                              exclude_ids=exclude[s:e] if exclude is not None else None,
                              dedup_threshold=cfg.dedup_threshold if cfg.self_exclusion else None,
                              with_payload=False, with_searched_vectors=columns is None, with_vectors=columns is None,
                              hnsw_ef=cfg.hnsw_ef)
                if columns is None:
                    vecs[s:e], keys[s:e] = nb.vectors, nb.searched_vectors
                else:
                    vecs[s:e], keys[s:e] = columns.gather(nb.ids, returned), columns.gather(nb.ids, searched)
                mask[s:e] = nb.mask
                advance(e - s)
        for a in (vecs, keys):
            a.flush()
        del vecs, keys
        np.save(tmp_mask, mask)  # beside, then renamed: a reader never sees part of a mask under its name
        durable.replace(tmp_mask, paths["mask"])
        # opened before pruning: a concurrent prune may unlink the names, the maps stay valid (POSIX keeps the data)
        vecs, keys = np.load(tmp["vectors"], mmap_mode="r"), np.load(tmp["keys"], mmap_mode="r")
        durable.replace(tmp["keys"], paths["keys"])
        durable.replace(tmp["vectors"], paths["vectors"])  # last: the cache counts as present once this exists
    except BaseException:
        for p in (*tmp.values(), tmp_mask):
            p.unlink(missing_ok=True)
        raise
    _prune_cache(root, cfg.cache_keep)
    return vecs, keys, mask


def class_members(ids: list[str], labels: np.ndarray) -> dict[int, frozenset[str]]:
    """Class -> the memory point ids of its pairs."""
    return {int(c): frozenset(ids[i] for i in np.flatnonzero(labels == c)) for c in np.unique(labels)}


def _tensors(nb: tuple, idx: np.ndarray, device: Any) -> list[torch.Tensor]:
    """The rows `idx` of neighbour arrays (vectors, keys, mask), as tensors on `device`."""
    return [torch.from_numpy(np.asarray(a[idx])).to(device) for a in nb]


def search_scores(q: np.ndarray | torch.Tensor, keys: Any, mask: Any) -> Any:
    """Cosine of each query [B, d] with its neighbours' keys [B, k, d] (their search scores); -inf where
    mask [B, k] is False. numpy or torch, as given."""
    if isinstance(q, torch.Tensor):
        return torch.einsum("bd,bkd->bk", q, keys).masked_fill(~mask, float("-inf"))
    s = np.einsum("bd,bkd->bk", q, np.asarray(keys, np.float32))
    return np.where(mask, s, -np.inf).astype(np.float32)
