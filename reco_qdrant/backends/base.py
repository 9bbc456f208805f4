"""What every backend shares: the protocol `Memory` talks to, the records and hits it returns, and the errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from ..config import MemoryConfig
from ..vector_copy import COPY_FIELD, VectorCopy

VECTOR_NAMES = ("image", "text")
_META_VECTOR = "_"
T = TypeVar("T")


class RecoMemoryError(RuntimeError):
    """Base class of the memory's errors (catch this for any of them). Formerly `MemoryError_`."""


class MemoryInUseError(RecoMemoryError):
    """Another process holds the embedded memory directory."""


class MemoryUnavailableError(RecoMemoryError):
    """The Qdrant server cannot be reached (after bounded retries)."""


class MemoryFullError(RecoMemoryError):
    """The disk of an embedded memory has too little free space for a write or an index build."""


# Free disk space an embedded memory keeps in reserve: the engine writes through memory maps into files it
# preallocates (32 MiB write-ahead-log segments), and a full disk there kills the process with SIGBUS
# instead of raising an error, so writes and index builds are refused while less than this would remain.
DISK_RESERVE = 256 * 2**20


class MemoryDamagedError(RecoMemoryError):
    """Files of an embedded memory cannot be read (truncated, garbled, missing, or from another version)."""


_RECOVER = ("check it with `reco doctor --memory {root}`; to recover, restore the directory from a copy, or move it "
            "away and re-ingest the same sources (point ids derive from source and key, so the same points come back)")


def _engine_failure(e: BaseException) -> bool:
    """An error the engine raised (including a Rust panic, which pyo3 raises as a BaseException)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


@dataclass
class Hits:
    """Hits of B queries, row by row (a row holds fewer than k hits when the memory does): ids, scores and
    payloads as the binding's lists, vectors as one array for all hits (one conversion per batch, not per hit)."""

    ids: list[list[str]]  # [B][<=k] point ids
    scores: list[list[float]]  # [B][<=k] similarity in the searched modality
    payloads: list[list[dict[str, Any]]]  # [B][<=k]
    vectors: np.ndarray | None  # [hits, d] float32, rows concatenated: the requested return modality
    searched: np.ndarray | None = None  # [hits, d] the same for the vector that was searched (with_searched=True)

    @classmethod
    def of(cls, rows: list[Any], return_vector: str | None, using: str, with_searched: bool) -> Hits:
        """From the engine's (or qdrant-client's) rows of scored points."""
        flat = [p for row in rows for p in row]

        def column(name: str | None) -> np.ndarray | None:
            return np.array([_named(p.vector, name) for p in flat], np.float32) if name else None

        return cls([[str(p.id) for p in row] for row in rows], [[p.score for p in row] for row in rows],
                   [[p.payload or {} for p in row] for row in rows], column(return_vector),
                   column(using if with_searched else None))

    @classmethod
    def concat(cls, parts: list[Hits]) -> Hits:
        """The hits of several batches of queries, in order."""
        def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            if not arrays or arrays[0] is None:
                return None
            full = [a for a in arrays if a.size]  # a batch without hits has no row width
            return np.concatenate(full) if full else arrays[0]

        return cls([r for h in parts for r in h.ids], [r for h in parts for r in h.scores],
                   [r for h in parts for r in h.payloads], cat([h.vectors for h in parts]),
                   cat([h.searched for h in parts]))


@dataclass
class Record:
    id: str
    vectors: dict[str, list[float]]
    payload: dict[str, Any]
    copy_entry: list[int] | None = None  # Edge: [row, crc] of the point in the vector copy (None: written without)


class Backend(Protocol):
    """Everything `Memory` needs from a Qdrant deployment; both backends implement all of it. Vectors are float32
    [N, d]. Where a deployment cannot tell (a server's free disk space), the answer is None: unknown."""

    # One process holds the storage at a time (embedded): the ledger can then acknowledge the engine's point count
    # after each write and opening can check it. A server's count moves with other processes' writes.
    exclusive: bool
    # The engine builds its indexes by itself (a server's optimizer); else `Memory` asks for builds when due.
    indexes_itself: bool
    # Upsert requests `Memory.add_embeddings` keeps in flight at once (1: one after another, in order).
    upload_workers: int

    def has_collection(self) -> bool: ...
    def create_collection(self, dim: int, cfg: MemoryConfig) -> None: ...
    def create_payload_index(self, field: str) -> None: ...
    def upsert(self, ids: list[str], image: np.ndarray, text: np.ndarray, payloads: list[dict]) -> None: ...
    def search(self, queries: np.ndarray, using: str, k: int, return_vector: str | None,
               exact: bool = False, with_payload: bool = True, with_searched: bool = False,
               hnsw_ef: int | None = None) -> Hits: ...
    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Record]: ...
    def scroll(self, limit: int, offset: Any, with_vectors: bool) -> tuple[list[Record], Any]: ...
    def delete(self, ids: list[str]) -> None: ...
    def count(self, source: str | None = None) -> int: ...
    def sources(self, limit: int = 10_000) -> dict[str, int]: ...
    def collections(self) -> dict[str, Any]:
        """Points per *other* memory collection at the same location (None: held by another process)."""
    def stored_quantization(self) -> str | None: ...
    def optimize(self) -> bool: ...
    def index_backlog(self) -> tuple[int, int]:
        """(points, vectors not yet indexed); no backlog where the engine indexes by itself."""
    def status(self) -> dict[str, Any]: ...
    def free_bytes(self) -> int | None:
        """Free space on the disk that holds the memory; None: unknown (a server's)."""
    def stored_bytes(self) -> int | None:
        """Bytes the collection takes on disk; None: unknown (a server's)."""
    def storage_paths(self) -> list[Path] | None:
        """The files and directories that hold the memory (collection, ledger, vector copy) where this process
        holds them; None for a server, whose files are not ours to copy (it takes snapshots instead)."""
    def snapshot(self) -> dict[str, str]:
        """Take the deployment's own snapshots of the collection and its ledger: {collection: snapshot name}.
        Raises `ValueError` where there are none (an embedded memory is backed up by copying its files)."""
    def check_vector_copy(self, records: list[Record]) -> None:
        """Compare these whole records with their rows in the vector copy, if any, and stop trusting the copy if
        they differ (the copy is a cache of the engine's vectors: the engine then answers)."""
    def stale_copy_rows(self, records: list[Record]) -> list[str] | None:
        """Ids of these whole records whose row in the vector copy is missing, damaged or holds other vectors;
        None without a vector copy."""
    def vector_copy_rows(self) -> int | None:
        """Rows in the vector copy (more than points once points were rewritten); None without one."""
    def copy_rows(self, records: list[Record]) -> tuple[VectorCopy, np.ndarray] | None:
        """The engine's own vector copy and the rows [N] of these records (scrolled with their payload) in it, every
        row checked against its checksum; None where the copy cannot serve them: a server (it keeps none), a memory
        written without one, a copy in doubt, a row lost or damaged (the copy is then no longer trusted)."""
    def meta_get(self, key: str) -> Any: ...
    def meta_set(self, key: str, value: Any) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


# Quantized copies of the vectors, kept in RAM and searched first; the hits are then rescored on the float vectors.
# Candidates searched per hit kept, chosen where recall@10 stops rising (benchmarks/README.md, "Quantization"):
# int8 (1 byte a dimension) loses nothing at 2; binary (2 bits a dimension, queries at 8 bits) needs more.
OVERSAMPLING = {"int8": 2.0, "binary": 6.0}


def check_quantization(cfg: MemoryConfig) -> str | None:
    """The quantization a new collection gets: None, "int8" or "binary" (anything else is refused)."""
    if cfg.quantization is not None and cfg.quantization not in OVERSAMPLING:
        raise ValueError(f"quantization {cfg.quantization!r} not supported: expected None, "
                         + " or ".join(repr(q) for q in OVERSAMPLING))
    return cfg.quantization


def _record(r: Any) -> Record:
    payload = dict(r.payload or {})
    return Record(str(r.id), dict(r.vector or {}), payload, payload.pop(COPY_FIELD, None))


def _meta_id(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"reco-meta:{key}"))


def _named(vec: Any, name: str) -> list[float] | None:
    if vec is None:
        return None
    return vec.get(name) if isinstance(vec, dict) else vec


def search_params(models: Any, cfg: MemoryConfig, k: int, exact: bool, hnsw_ef: int | None) -> Any:
    """The search settings both engines use, built from `models` (Qdrant Edge's or qdrant-client's, which name them
    alike): the HNSW beam at least k wide; quantized vectors searched for more candidates, then rescored."""
    quant = (models.QuantizationSearchParams(ignore=exact, rescore=True, oversampling=OVERSAMPLING[cfg.quantization])
             if cfg.quantization else None)
    return models.SearchParams(hnsw_ef=max(hnsw_ef or cfg.hnsw_ef, k), exact=exact, quantization=quant)


def _vector_names(return_vector: str | None, using: str, with_searched: bool) -> list[str] | bool:
    names = list(dict.fromkeys(n for n in (return_vector, using if with_searched else None) if n))
    return names or False

