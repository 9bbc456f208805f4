"""The memory: image-text pairs in Qdrant, added in batches and searched in batches."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import durable, migrations
from .backends import (
    DISK_RESERVE,
    VECTOR_NAMES,
    Backend,
    Hits,
    MemoryDamagedError,
    MemoryError_,
    MemoryFullError,
    MemoryInUseError,
    MemoryUnavailableError,
    Record,
    count_edge_collection,
    edge_collections,
    open_backend,
)
from .config import MemoryConfig
from .progress import progress_bar, status_line
from .vector_copy import COPY_FIELD

__all__ = ["Memory", "Neighbours", "Restored",
           "EncoderMismatchError", "UnverifiedEncoderWarning", "IndexPostponedWarning",
           "MemoryInUseError",
           "MemoryDamagedError", "MemoryFullError", "MemoryUnavailableError", "MemoryError_", "point_id",
           "validate_embeddings"]

_ID_NAMESPACE = uuid.UUID("6f1c2b1e-8e0a-4c55-9d7e-2f2d1a0b7c11")
ENCODER_KEY = "encoder"
UID_KEY = "memory_uid"
# {"n": writes so far, "token": random}: keys caches of search results; on Edge also "points": [low, high], the
# point counts the engine may hold (the range the last write may leave if interrupted; one count once acknowledged)
WRITE_VERSION_KEY = "write_version"
LAYOUT_KEY = "layout"  # collection settings fixed at creation (see migrations 0001 and 0003)
SNAPSHOT_MANIFEST = "qdrant-snapshots.json"  # what a server memory's backup directory holds (the snapshots stay there)
OPEN_SAMPLE = 256  # points whose vectors are checked on opening (the lowest ids: spread over the storage)
COLLECTION_UID_KEY = "collection_uid"  # new each time the collection is (re)created: keys the ingest ledger
UNSPECIFIED = "unspecified"  # encoder id recorded when vectors arrive without one
EXACT_SEARCH_BELOW = 20_000  # points; below this Edge searches exactly and needs no HNSW build
RESERVED_PAYLOAD = ("caption", "source", "key", COPY_FIELD)


def index_due(points: int, unindexed: int, threshold: int = EXACT_SEARCH_BELOW) -> bool:
    """Whether an index build is due: more than `threshold` points, and more than `threshold` vectors
    unindexed that are also more than a fifth of the indexed ones (see `Memory.ensure_indexed`)."""
    indexed = points * len(VECTOR_NAMES) - unindexed
    return points > threshold and unindexed > max(threshold, indexed // 5)


@dataclass(frozen=True)
class Restored:
    """What `Memory.restore` brought back: the memory's `points`, and whether that count was `verified`: compared
    with, and equal to, one exact count the backup acknowledged. A backup that records none cannot be verified
    (`why` says what it lacks): a server snapshot location given without the manifest `reco backup` writes, or a
    memory directory copied by hand while open (its ledger holds a range) or written by an older version."""

    points: int
    verified: bool
    why: str = ""  # when not verified: why the backup records no exact count


class EncoderMismatchError(MemoryError_):
    """Vectors or an encoder that do not match the encoder the memory was built with."""


class IndexPostponedWarning(UserWarning):
    """An index build that was due when reading did not fit on the disk: postponed, searches stay exact."""


class UnverifiedEncoderWarning(UserWarning):
    """The memory records no encoder id, so an encoder used with it cannot be checked."""


def point_id(source: str, key: str | int) -> str:
    """Deterministic point id for an item: re-ingesting (source, key) updates instead of duplicating."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{source}\x1f{key}"))


def validate_embeddings(x: Any, name: str, dim: int | None = None, origin: str = "input",
                        row_offset: int = 0) -> np.ndarray:
    """Check an embedding matrix and return it float32 [N, d], L2-normalised.

    Rejects (naming `origin` and the row) non-2-D arrays, non-float dtypes, a dimension other than
    `dim`, NaN/inf values and zero vectors, rather than storing something that silently differs.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{origin}: {name} must be a 2-D array [N, d], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{origin}: {name} must be float16/32/64, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise EncoderMismatchError(f"{origin}: {name} have dimension {x.shape[1]}, expected {dim} "
                                   "(the dimension of this memory's encoder)")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0]) + row_offset
        raise ValueError(f"{origin}: {name} row {row} holds NaN or inf")
    if x.dtype.itemsize > 4 and x.size:
        big = (np.abs(x) > np.finfo(np.float32).max).any(axis=1)
        if big.any():
            raise ValueError(f"{origin}: {name} row {int(np.flatnonzero(big)[0]) + row_offset} holds values beyond "
                             "float32's range")
    x = x.astype(np.float32, copy=False)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]  # float64: no overflow at 1e20+
    if (norms <= 1e-12).any():
        row = int(np.flatnonzero(norms[:, 0] <= 1e-12)[0]) + row_offset
        raise ValueError(f"{origin}: {name} row {row} is a zero vector")
    off = np.abs(norms[:, 0] - 1.0) > 1e-6  # rows already unit-norm keep their exact bits (copies stay identical)
    if off.any():
        x = x.copy()
        x[off] = (x[off] / norms[off]).astype(np.float32)
    return x


@dataclass
class Neighbours:
    """k neighbours for each of B queries. Missing hits (fewer than k exist) have id "" and mask False."""

    ids: np.ndarray  # [B, k] str point ids
    scores: np.ndarray  # [B, k] float32 cosine similarity in the searched modality
    vectors: np.ndarray | None  # [B, k, d] float32 vectors of `return_modality`, L2-normalised
    payloads: list[list[dict[str, Any]]]  # [B][k]
    keys: np.ndarray | None = None  # [B, k, d] float32 vectors of the searched modality (with_keys=True)

    @property
    def captions(self) -> list[list[str]]:
        return [[p.get("caption", "") for p in row] for row in self.payloads]

    @property
    def mask(self) -> np.ndarray:
        """[B, k] bool: True where a hit exists."""
        return self.ids != ""


class VectorColumns:
    """The memory's vectors as columns: `vectors[modality]` [M, d] float16 (memory-mapped) and the point id
    of each row, `ids` [M]."""

    def __init__(self, ids: np.ndarray, vectors: dict[str, np.ndarray]) -> None:
        self.ids, self.vectors = ids, vectors
        self._row = {pid: i for i, pid in enumerate(ids.tolist())}
        self._row[""] = -1  # no hit

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each point id (any shape); -1 for "" (no hit). Unknown ids are an error (a stale column)."""
        get = self._row.get
        flat = [get(i, -2) for i in np.asarray(ids).ravel().tolist()]
        rows = np.array(flat, np.int64).reshape(np.shape(ids))
        if (rows == -2).any():
            raise MemoryError_(f"point {np.asarray(ids).ravel()[int(np.argmax(rows.ravel() == -2))]} is not in the "
                               "memory's vector columns: they are stale")
        return rows

    def gather(self, ids: np.ndarray, modality: str) -> np.ndarray:
        """Vectors [..., d] float16 of point `ids` [...]; zeros where the id is "" (no hit)."""
        rows = self.rows(ids)
        out = self.vectors[modality][np.maximum(rows, 0)]
        out[rows < 0] = 0
        return out


class Memory:
    """A memory of image-text pairs in one Qdrant collection (embedded Edge, local or server).

    Open it with `Memory.open(location)`: a directory (Qdrant Edge, the embedded default),
    ":memory:" (qdrant-client local mode, for tests) or "http(s)://host[:port]" (a server).
    """

    def __init__(self, backend: Backend, cfg: MemoryConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self._explicit: set[str] = set()  # MemoryConfig fields the caller set (not defaults)
        self._encoder_record: dict[str, Any] | None = None  # cached once known (it never changes back)
        self._auto_index = False  # set by open(): build the index lazily, before a search needs it
        self._unchecked_writes = 0  # points written since the index was last checked
        self._postponed_warned = False  # an index build a read found due did not fit on the disk (warned once)
        # after a postponed build: (free bytes it needs, `_unchecked_writes` then, bytes per point written since);
        # searches retry it only once the disk has that much free (a cheap statvfs), not on every search
        self._postponed: tuple[int, int, float] | None = None
        self._wrote = False  # Edge: written since the ledger last acknowledged one point count (see close)
        # Edge, on opening: what the ledger acknowledged ("exact": one count, "range": a write was in progress,
        # "none": nothing recorded), and (was, now) when `accept_count` adopted another count
        self.count_check = "none"
        self.adopted_count: tuple[str, int] | None = None
        # One writer at a time among the threads sharing this memory: collection creation, upserts and their
        # vector-copy rows, deletes, ledger and encoder records, migrations and index builds. (Reads take it only
        # to build an index that is due.) Reentrant: a write creates the collection, an index build checks space.
        self._write_lock = threading.RLock()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, location: str | None = None, *, encoder: Any = None, migrate: bool = True,
             auto_index: bool = True, repair_ledger: bool = False, accept_count: bool = False,
             check_sample: bool = True, check_count: bool = True, **settings: Any) -> Memory:
        """Open (creating if needed) the memory at `location`.

        Args:
            location: directory | ":memory:" | URL; default `RECO_MEMORY` or "./reco-data".
            encoder: an `Encoder` (or its id string) that must match the memory's recorded encoder.
            migrate: apply pending schema migrations (idempotent).
            repair_ledger: on Edge, rebuild a missing ledger from the collection (else that is an error).
            accept_count: on Edge, adopt the engine's point count when it differs from the count the ledger
                acknowledged (else that is a `MemoryDamagedError`): after a deliberate change made outside. Also
                adopts an empty engine whose collection directory is gone. `adopted_count` then says (was, now).
            check_count: on Edge, compare the engine's count with the ledger's (False: neither compared nor adopted,
                for `reco doctor`, which reads every point before `accept_count()`).
            check_sample: on Edge, check the vectors of a fixed sample of points (`OPEN_SAMPLE`) on opening.
            auto_index: on Edge, build the HNSW index when many points are unindexed: on opening, and
                before the first search after writes that left many unindexed (see `ensure_indexed`).
            **settings: any `MemoryConfig` field (collection, api_key, quantization, ...).
        """
        cfg = MemoryConfig(**settings) if location is None else MemoryConfig(location=str(location), **settings)
        cfg = cfg.with_env()
        mem = cls(open_backend(cfg, repair_ledger), cfg)
        defaults = MemoryConfig(location=cfg.location)
        mem._explicit = {f.name for f in fields(MemoryConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}
        try:
            if mem.backend.meta_get(UID_KEY) is None:
                mem.backend.meta_set(UID_KEY, str(uuid.uuid4()))
            mem._adopt_layout()
            if cfg.kind == "edge" and check_count:
                if mem.backend.has_collection():
                    mem._check_points(accept_count, check_sample)
                else:
                    mem._check_collection_gone(accept_count)
            if encoder is not None:
                mem.check_encoder(getattr(encoder, "id", encoder), getattr(encoder, "dim", None))
            if migrate and (mem.dim is not None or mem.backend.has_collection()):
                mem.migrate()
            mem._auto_index = auto_index and cfg.kind == "edge"
            if mem._auto_index:
                mem._index_if_room()
        except BaseException:
            mem.close()
            raise
        return mem

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._write_lock:
            try:
                if self._wrote and self.backend.has_collection():  # this session's writes: one count acknowledged
                    self._ack_points()
            finally:
                self.backend.close()

    # ------------------------------------------------------------------ identity
    @property
    def encoder_record(self) -> dict[str, Any] | None:
        """{"id": encoder id, "dim": d, ...} recorded with the memory, or None before any data."""
        rec = self._encoder_record
        if rec is None or rec["id"] == UNSPECIFIED:  # another process may record it meanwhile
            rec = self._encoder_record = self.backend.meta_get(ENCODER_KEY)
        return rec

    @property
    def dim(self) -> int | None:
        rec = self.encoder_record
        return None if rec is None else int(rec["dim"])

    @property
    def uid(self) -> str:
        """A random id given to the memory when it was created (keys caches of its neighbours)."""
        return str(self.backend.meta_get(UID_KEY))

    def check_encoder(self, encoder_id: str | None, dim: int | None = None,
                      record: bool = False, extra: dict[str, Any] | None = None) -> None:
        """Fail clearly when `encoder_id`/`dim` differ from the memory's encoder; record them if new.

        A memory filled without an encoder id records "unspecified". The first write that names an
        encoder (`record=True`) pins it; from then on every other id is refused. A read that names an
        encoder while none is pinned cannot be checked and warns (pin it with `reco migrate --encoder-id`).
        """
        rec = self.encoder_record
        if rec is None:
            if record and dim is not None:
                self._set_encoder_record({"id": encoder_id or UNSPECIFIED, "dim": int(dim), "normalized": True,
                                          **(extra or {})})
            return
        if dim is not None and int(dim) != int(rec["dim"]):
            raise EncoderMismatchError(f"memory {self.cfg.location} holds {rec['dim']}-d vectors "
                                       f"from {rec['id']!r}; got {dim}-d from {encoder_id or 'input'!r}")
        if record and extra and encoder_id == rec["id"] and any(k not in rec for k in extra):
            self._set_encoder_record({**extra, **rec})  # learn how to load it, once
        if encoder_id and rec["id"] == UNSPECIFIED:
            if record:
                self._set_encoder_record({**rec, **(extra or {}), "id": encoder_id})
            else:
                warnings.warn(f"memory {self.cfg.location} records no encoder id, so {encoder_id!r} cannot be "
                              "checked against the encoder that made its vectors; record it with "
                              "`reco migrate --encoder-id ID`", UnverifiedEncoderWarning, stacklevel=3)
        elif encoder_id and encoder_id != rec["id"]:
            raise EncoderMismatchError(f"memory {self.cfg.location} was built with encoder {rec['id']!r}, "
                                       f"not {encoder_id!r}; use the same encoder or another memory")

    def _set_encoder_record(self, rec: dict[str, Any]) -> None:
        with self._write_lock:
            self.backend.meta_set(ENCODER_KEY, rec)
            self._encoder_record = rec

    @property
    def write_version(self) -> str:
        """Changes with every upsert and delete (from any process): keys caches of search results."""
        v = self.backend.meta_get(WRITE_VERSION_KEY) or {"n": 0, "token": ""}
        return f"{v['n']}-{v['token']}"

    def _bump_write_version(self, low: int = 0, high: int = 0) -> None:
        # Bumped *before* the write: a crash in between costs a cache miss, never a stale hit. The random
        # token keeps two writers that both read n from colliding on n + 1. On Edge the same record (one ledger
        # write per data write) says how many points the write may leave: the engine's count plus low..high.
        with self._write_lock:
            v = self.backend.meta_get(WRITE_VERSION_KEY) or {"n": 0}
            rec = {"n": int(v["n"]) + 1, "token": uuid.uuid4().hex[:12]}
            if self.cfg.kind == "edge":
                n = self.backend.count()
                rec["points"] = [max(0, n + low), n + high]
                self._wrote = True
            self.backend.meta_set(WRITE_VERSION_KEY, rec)

    def _ack_points(self, n: int | None = None) -> None:
        """Edge: the ledger acknowledges the engine's count `n` (default: now) as the one count it may hold."""
        with self._write_lock:
            v = self.backend.meta_get(WRITE_VERSION_KEY) or {"n": 0, "token": ""}
            n = self.backend.count() if n is None else n
            self.backend.meta_set(WRITE_VERSION_KEY, {**v, "points": [n, n]})
            self._wrote = False

    @property
    def collection_uid(self) -> str:
        """A random id given to the collection when it was (re)created; "" before that."""
        return str(self.backend.meta_get(COLLECTION_UID_KEY) or "")

    def _adopt_layout(self) -> None:
        """Take the settings the collection was created with (quantization, ...) from its record.

        Settings the caller left at their defaults are filled from the record, so an int8 memory
        reopened without `quantization=` still searches with rescoring; one set to another value is refused.
        """
        layout = self.backend.meta_get(LAYOUT_KEY)
        if not layout:
            return
        clash = {k: (getattr(self.cfg, k), v) for k, v in layout.items()
                 if k in self._explicit and getattr(self.cfg, k) != v}
        if clash:
            said = ", ".join(f"{k}={got!r} (created with {want!r})" for k, (got, want) in clash.items())
            raise ValueError(f"memory {self.cfg.location} was created with other settings: {said}; these are fixed "
                             "when the collection is created: omit them, or copy into a new memory (`reco copy`)")
        self.cfg = replace(self.cfg, **{k: v for k, v in layout.items() if hasattr(self.cfg, k)})
        self.backend.cfg = self.cfg

    # ------------------------------------------------------------------ schema
    def migrate(self, dim: int | None = None) -> list[str]:
        """Apply pending schema migrations in order; returns the names applied (none if up to date)."""
        with self._write_lock:
            applied = migrations.apply_pending(self.backend, self.cfg, dim or self.dim)
            if applied:
                self._adopt_layout()
            return applied

    def pending_migrations(self) -> list[str]:
        return [f"{m.version:04d}_{m.name}" for m in migrations.pending(self.backend)]

    # ------------------------------------------------------------------ writing
    def add_embeddings(
        self,
        image_embeddings: np.ndarray,
        text_embeddings: np.ndarray,
        captions: Sequence[str],
        ids: Sequence[str | int] | None = None,
        source: str = "default",
        payloads: Sequence[dict[str, Any]] | None = None,
        encoder_id: str | None = None,
        origin: str = "input",
        row_offset: int = 0,
        encoder_spec: dict[str, Any] | None = None,
    ) -> list[str]:
        """Upsert image-text pairs; returns their point ids.

        Args:
            image_embeddings: [N, d] image vectors (normalised here; NaN/inf/zero rejected).
            text_embeddings: [N, d] text vectors of the same pairs.
            captions: N non-empty captions.
            ids: N keys unique within `source`; the point id is derived from (source, key), so adding
                the same key again updates the point. Default: a hash of the pair's content.
            source: where the items come from (a dataset or shard name), stored in the payload.
            payloads: N dicts of extra metadata (e.g. `uri`, `lang`), stored as data.
            encoder_id: the encoder that produced the vectors; checked against the memory's.
            origin, row_offset: name the file and first row in error messages.
            encoder_spec: how to load that encoder (`Encoder.spec`), recorded so later commands need no --model.
        """
        n = len(captions)
        img = validate_embeddings(image_embeddings, "image embeddings", self.dim, origin, row_offset)
        txt = validate_embeddings(text_embeddings, "text embeddings", img.shape[1], origin, row_offset)
        if not (img.shape[0] == txt.shape[0] == n):
            raise ValueError(f"{origin}: {img.shape[0]} image embeddings, {txt.shape[0]} text embeddings "
                             f"and {n} captions: expected the same number of each")
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"{origin}: row {i + row_offset} has an empty or non-text caption ({c!r})")
        if ids is not None and len(ids) != n:
            raise ValueError(f"{origin}: {len(ids)} ids for {n} items")
        if payloads is not None and len(payloads) != n:
            raise ValueError(f"{origin}: {len(payloads)} payloads for {n} items")
        keys = list(ids) if ids is not None else [_content_key(img[i], captions[i]) for i in range(n)]
        pids = [point_id(source, k) for k in keys]
        if len(set(pids)) != n:
            seen: dict[str, int] = {}
            for i, pid in enumerate(pids):
                if pid in seen:
                    raise ValueError(f"{origin}: rows {seen[pid] + row_offset} and {i + row_offset} have the same "
                                     f"key {str(keys[i])!r}: keys must be unique within a source")
                seen[pid] = i
        out = []
        for i in range(n):
            extra = {k: v for k, v in (payloads[i] if payloads else {}).items() if k not in RESERVED_PAYLOAD}
            out.append({"caption": captions[i], "source": source, "key": str(keys[i]), **extra})
        copies = 3 if self.cfg.vector_copy else 2  # vectors: storage + WAL (+ the vector copy)
        with self._write_lock:  # one writer at a time: the collection is created once, copy rows never shared
            self._check_space(n * (copies * 2 * 4 * img.shape[1] + 1024), "this write")
            self.check_encoder(encoder_id, img.shape[1], record=True,
                               extra={"load": encoder_spec} if encoder_spec else None)
            if not self.backend.has_collection():
                self.migrate(img.shape[1])
            self._bump_write_version(0, n)
            step = self.cfg.upsert_batch
            for s in range(0, n, step):
                self.backend.upsert(pids[s : s + step], img[s : s + step], txt[s : s + step], out[s : s + step])
                self._unchecked_writes += min(step, n - s)
        return pids

    def delete(self, ids: Sequence[str]) -> None:
        """Remove points by id."""
        if ids:
            with self._write_lock:
                self._bump_write_version(-len(ids), 0)
                self.backend.delete(list(ids))

    # ------------------------------------------------------------------ damage found on opening
    def _check_points(self, accept_count: bool = False, check_sample: bool = True) -> None:
        """On opening (Edge): the engine holds the count of points the ledger acknowledged (or one a write in
        progress may have left), and a fixed sample of points has whole vectors equal to their copy. Cheap: one
        count and one read of `OPEN_SAMPLE` points; `reco doctor` reads everything."""
        engine = self.backend.count()
        rec = self._acknowledged()  # none: written by an older version
        root = self.cfg.location
        self.count_check = "none" if rec is None else "exact" if rec[0] == rec[1] else "range"
        if rec is not None and not int(rec[0]) <= engine <= int(rec[1]):
            said = _said_count(rec)
            if accept_count:
                self.adopted_count = (said, engine)
                self.count_check = "none"  # adopted, not verified
            else:
                err = MemoryDamagedError(
                    f"memory {root}: the engine holds {engine:,} points, but the ledger acknowledged {said} (segments "
                    "lost or restored from another copy?); restore the directory from a complete copy, or, after a "
                    f"deliberate change made outside reco-qdrant, adopt the engine's count with `reco doctor --memory "
                    f"{root} --accept-count`")
                err.counts = (engine, said)  # type: ignore[attr-defined]  # for messages about a backup
                raise err
        if rec is None or accept_count or list(rec) != [engine, engine]:
            self._ack_points(engine)
        problem = self._sample_problem() if check_sample else None
        if problem:
            err = MemoryDamagedError(f"memory {root}: {problem}; restore the directory from a copy, or check every "
                                     f"point with `reco doctor --memory {root}`")
            err.problem = problem  # type: ignore[attr-defined]
            raise err

    def _acknowledged(self) -> list[int] | None:
        """Edge: [low, high], the point counts the ledger acknowledged (one count when equal); None if unrecorded."""
        rec = (self.backend.meta_get(WRITE_VERSION_KEY) or {}).get("points")
        return None if rec is None else [int(rec[0]), int(rec[1])]

    def _check_collection_gone(self, accept_count: bool = False) -> None:
        """On opening (Edge) a memory without its collection directory: fine when the ledger acknowledged no point
        (a new memory); else the points are lost, and re-creating the collection empty would hide it for good."""
        rec = self._acknowledged()
        self.count_check = "none" if rec is None else "exact" if rec == [0, 0] else "range" if rec[0] == 0 else ""
        if rec is None or rec[0] == 0:
            return
        said, root = _said_count(rec), self.cfg.location
        if accept_count:  # a deliberate start from empty: the collection is created again, empty
            self._ack_points(0)
            self.adopted_count, self.count_check = (said, 0), "none"
            return
        err = MemoryDamagedError(
            f"memory {root}: the engine holds 0 points (its collection directory {self.backend.data_path} is "
            f"missing), but the ledger acknowledged {said} (deleted by hand, or an incomplete copy or restore?); "
            f"restore the directory from a backup (`reco restore BACKUP --memory DIR`), or, to start again from an "
            f"empty collection deliberately, adopt the empty engine with `reco doctor --memory {root} --accept-count` "
            "(`Memory.open(..., accept_count=True)`)")
        err.counts = (0, said)  # type: ignore[attr-defined]
        raise err

    def accept_count(self) -> tuple[str, int]:
        """Edge: make the ledger acknowledge the engine's point count (after a deliberate change made outside
        reco-qdrant, once `reco doctor` found every point whole). Returns (what the ledger acknowledged before,
        said: "1,200", "between 100 and 200" or "nothing", the count now)."""
        with self._write_lock:
            rec = self._acknowledged()
            now = self.backend.count()
            self._ack_points(now)
            self.adopted_count = ("nothing" if rec is None else _said_count(rec), now)
            return self.adopted_count

    def _sample_problem(self) -> str | None:
        """What is wrong with the vectors of the first `OPEN_SAMPLE` points (by id), or None."""
        recs, _ = self.backend.scroll(OPEN_SAMPLE, None, True)
        dim, copy = self.dim, getattr(self.backend, "copy", None)
        for r in recs:
            for m in VECTOR_NAMES:
                v = r.vectors.get(m)
                if v is None or (dim is not None and len(v) != dim):
                    return f"point {r.id} has no whole {m} vector ({0 if v is None else len(v)} values)"
                x = np.asarray(v, np.float32)
                norm = float(np.linalg.norm(x)) if np.isfinite(x).all() else float("nan")
                if not abs(norm - 1.0) <= 1e-3:
                    return f"point {r.id}'s {m} vector has norm {norm:.4g}, expected 1 (its vector file is damaged)"
        entries = [r.copy_entry for r in recs]
        if copy is not None and recs and all(e is not None for e in entries) and self.backend.copy_doubt is None:
            got = copy.read(np.array(entries, np.int64).reshape(-1, 2))
            same = got is not None and all(
                np.abs(got[m][i] - np.asarray(r.vectors[m], np.float32)).max() <= 1e-5
                for i, r in enumerate(recs) for m in VECTOR_NAMES)
            if not same:  # the copy is a cache of the engine's vectors: distrusted (said once), the engine answers
                self.backend._distrust_copy("found on opening: sampled points' rows do not hold their vectors: "
                                            "lost in a crash, damaged, or from another memory")
        return None

    def optimize(self) -> bool:
        """Build indexes now (Edge: HNSW over unindexed segments; a server does this by itself).

        Raises `MemoryFullError` (before building anything) when the rebuilt segments would not fit on the disk."""
        with self._write_lock:
            self._check_index_room()
            return self.backend.optimize()

    def _check_index_room(self) -> None:
        if self.cfg.kind == "edge" and self.backend.has_collection():
            self._check_space(self.backend.stored_bytes(), "building the index")  # rebuilt beside the old

    def _index_if_room(self) -> bool:
        """The index build a read finds due (on opening, before a search): one that fails (no room on the disk by
        our estimate, or the engine's own error, e.g. a disk that filled meanwhile) is postponed with one warning,
        and reads go on (segments not indexed are searched exactly: correct, slower). Reads are never refused
        because an index could not be built; searches retry it once the disk has room (see `_index_retry_due`)."""
        try:
            return self.ensure_indexed()
        except (MemoryFullError, OSError, RuntimeError) as e:
            if isinstance(e, MemoryError_) and not isinstance(e, MemoryFullError):
                raise  # damage, a memory in use, ...: not an index build that did not fit
            self._unchecked_writes = max(self._unchecked_writes, 1)  # still due: a later search tries again
            self._postpone(e)
            if not self._postponed_warned:
                self._postponed_warned = True
                cause = str(e) if isinstance(e, MemoryFullError) else f"the engine failed: {type(e).__name__}: {e}"
                warnings.warn(f"index build postponed: {cause}; searches stay correct (exact over what is not "
                              "indexed); the build runs on a later open, or search once the disk has room, or by "
                              "`Memory.optimize()`",
                              IndexPostponedWarning, stacklevel=4)
            return False

    def _postpone(self, e: BaseException) -> None:
        """Remember what a failed build needs before a search tries it again: room on the disk after a space
        failure; after any other failure, new writes (need 0: the retry waits for a write, not for space)."""
        space = isinstance(e, MemoryFullError) or getattr(e, "errno", None) == errno.ENOSPC or any(
            s in str(e) for s in ("No space left", "os error 28"))
        try:
            if not space:
                raise LookupError
            free = self.backend.free_bytes()
            need = getattr(e, "need", None)
            stored = self.backend.stored_bytes() if need is None else need - DISK_RESERVE
            if need is None:  # the engine ran out of room though our estimate said it fits: wait for clearly more
                need = max(stored + DISK_RESERVE, free + max(stored // 10, 64 * 2**20))
            points = max(self.backend.status().get("points", 0), 1)
        except (LookupError, OSError, RuntimeError):  # not about space, or cannot tell: retry after the next write
            need, stored, points = -1, 0, 1
        self._postponed = (int(need), self._unchecked_writes, stored / points)

    def _index_retry_due(self) -> bool:
        """Whether a search should try the due index build: not postponed, or the disk now has the room the
        postponed build needed (plus what was written since). Cheap (statvfs): runs before the write lock."""
        p = self._postponed
        if p is None:
            return True
        need, writes, per_point = p
        if need < 0:  # a failure that was not about space: try again once something was written
            return self._unchecked_writes > writes
        need += int(per_point * max(0, self._unchecked_writes - writes))
        try:
            return self.backend.free_bytes() >= need
        except OSError:
            return False

    def ensure_indexed(self, threshold: int = EXACT_SEARCH_BELOW, progress: bool = True) -> bool:
        """On Edge, build the HNSW index (`optimize()`) when more than `threshold` vectors are unindexed and
        they are more than a fifth of the indexed ones (so a stream of writes between searches triggers
        geometrically spaced builds, O(log n) of them, not one per batch).

        A memory opened with `auto_index=True` (the default) calls this on opening and before the first
        search after writes, so a memory filled from Python is indexed before its searches get slow, as a
        server's optimizer would do by itself. The build blocks the caller (Edge runs it in-process, holding
        the GIL): searches wait for it and are never served from a half-built index. Fewer unindexed
        vectors than `threshold` are searched exactly, which is fast at that size.

        Raises `MemoryFullError` (before building or printing anything) when the build would not fit on the disk.
        """
        with self._write_lock:
            points, unindexed = self.index_backlog()
            if not index_due(points, unindexed, threshold):
                self._unchecked_writes, self._postponed = 0, None
                return False
            self._check_index_room()  # before the status line: it announces only a build that really starts
            with status_line(f"indexing {unindexed:,} vectors of {points:,} points (HNSW; searches wait for it)",
                             progress):
                built = self.backend.optimize()  # a failure leaves the writes unchecked: a later search retries
            self._unchecked_writes, self._postponed = 0, None
            return built

    def _check_space(self, need: int, what: str) -> None:
        """Refuse (before writing anything) what would leave an embedded memory's disk nearly full."""
        if self.cfg.kind != "edge":
            return
        free = self.backend.free_bytes()
        if free < need + DISK_RESERVE:
            mib = 2**20
            err = MemoryFullError(
                f"memory {self.cfg.location}: {free / mib:,.0f} MiB free on its disk, {what} needs about "
                f"{(need + DISK_RESERVE) / mib:,.0f} MiB ({need / mib:,.0f} MiB of data plus {DISK_RESERVE / mib:.0f} "
                "MiB the engine keeps for its write-ahead log); free space (or move the memory to a larger disk with "
                "`reco copy`) and run it again: what was stored is intact and an ingest resumes")
            err.need = need + DISK_RESERVE  # type: ignore[attr-defined]  # free bytes it needs (see _postpone)
            raise err

    def index_backlog(self) -> tuple[int, int]:
        """(points, vectors not yet indexed); (points, 0) on a server, which indexes by itself."""
        st = self.backend.status()
        points = st.get("points", 0)
        if self.cfg.kind != "edge":
            return points, 0
        return points, points * len(VECTOR_NAMES) - st.get("indexed_vectors", 0)

    def flush(self) -> None:
        self.backend.flush()

    # ------------------------------------------------------------------ reading
    def count(self, source: str | None = None) -> int:
        """Points in the memory (of one `source` only, when given)."""
        return self.backend.count(source)

    def sources(self) -> dict[str, int]:
        """Points per source (the `source` each pair was ingested under), largest first."""
        return dict(sorted(self.backend.sources().items(), key=lambda kv: (-kv[1], kv[0])))

    def collections(self) -> dict[str, int | None]:
        """Points per collection at this memory's location, this one included (None: held by another process; on
        Edge an `UnreadableCollection`, or an `UncountedCollection` when the disk is too full to load it)."""
        if self.cfg.kind == "edge":
            root = Path(self.cfg.location)
            return {n: self.count() if n == self.cfg.collection else count_edge_collection(root, n)
                    for n in sorted({*edge_collections(root), self.cfg.collection})}
        return {**self.backend.collections(), self.cfg.collection: self.count()}

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of point `ids` already stored (an upsert of these replaces them)."""
        if not ids or not self.backend.has_collection():
            return set()
        return {r.id for r in self.backend.retrieve(list(ids), with_vectors=False)}

    def search(self, queries: np.ndarray, modality: str = "image", k: int = 10,
               return_modality: str | None = "text", exact: bool = False,
               batch_size: int = 256, with_payload: bool = True, with_keys: bool = False,
               hnsw_ef: int | None = None) -> Neighbours:
        """Nearest neighbours of each query among the memory's `modality` vectors.

        Args:
            queries: [B, d] or [d] query embeddings (normalised here).
            modality: which named vectors to search, "image" or "text".
            k: neighbours per query.
            return_modality: which vector of each hit to return ("text", "image" or None).
            exact: brute-force search instead of the index (ground truth for recall).
            batch_size: queries per request to Qdrant (one batched call each).
            with_payload: return captions and metadata (False when only vectors are needed: faster).
            with_keys: also return each hit's vector in the searched modality (`keys`).
            hnsw_ef: HNSW search width for this call (default: the memory's `hnsw_ef`).
        Returns:
            `Neighbours` with ids/scores [B, k], vectors [B, k, d], payloads.
        """
        for m in (modality, return_modality):
            if m is not None and m not in VECTOR_NAMES:
                raise ValueError(f"modality must be one of {VECTOR_NAMES}, got {m!r}")
        q = np.asarray(queries)
        q = validate_embeddings(q[None] if q.ndim == 1 else q, "queries", self.dim, "search")
        if self._auto_index and self._unchecked_writes and self._index_retry_due():  # cheap: before the lock
            with self._write_lock:
                if self._unchecked_writes and self._index_retry_due():  # another thread may have just built it
                    self._index_if_room()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not self.backend.has_collection():
            raise MemoryError_(f"memory {self.cfg.location} is empty: ingest image-text pairs first")
        hits = Hits.concat([self.backend.search(q[s : s + batch_size], modality, k, return_modality, exact,
                                                with_payload, with_keys, hnsw_ef)
                            for s in range(0, len(q), batch_size)])
        if any(len(row) < k for row in hits.ids):  # counted only then: a count per search costs ~5% at 200k points
            total = self.count()
            if total == 0:
                raise MemoryError_(f"memory {self.cfg.location} is empty: ingest image-text pairs first")
            if k > total:
                raise ValueError(f"k={k} neighbours asked, but the memory holds {total} points")
        return _to_neighbours(hits, k, q.shape[1] if return_modality else None, q.shape[1] if with_keys else None)

    def near_duplicates(self, queries: np.ndarray, threshold: float = 0.95, modality: str = "image",
                        exact: bool = False, batch_size: int = 256) -> list[str]:
        """Ids of the points whose `modality` vector has cosine >= `threshold` with any query [B, d].

        Used to purge an evaluation set's images from the memory before evaluating (as the paper does).
        `exact` searches by brute force instead of the index (slow on large memories; near-duplicates
        are easy for HNSW).
        """
        return sorted(set().union(*self.near_duplicate_sets(queries, threshold, modality, exact, batch_size)))

    def near_duplicate_sets(self, queries: np.ndarray, threshold: float = 0.95, modality: str = "image",
                            exact: bool = False, batch_size: int = 256) -> list[set[str]]:
        """For each query [B, d], the ids of the points whose `modality` vector has cosine >= `threshold`
        with it; the search widens until the last hit of every query falls below the threshold."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        q = np.asarray(queries)
        q = validate_embeddings(q[None] if q.ndim == 1 else q, "queries", self.dim, "near_duplicates")
        total = self.count()
        found: list[set[str]] = [set() for _ in range(len(q))]
        for s in range(0, len(q), batch_size):
            todo, k = np.arange(s, min(len(q), s + batch_size)), min(16, total)
            while len(todo) and total:
                nb = self.search(q[todo], modality, k, None, exact=exact, with_payload=False)
                hit = nb.mask & (nb.scores >= threshold)
                for j, i in enumerate(todo):
                    found[i].update(nb.ids[j, hit[j]].tolist())
                more = hit[:, -1]  # all k were near-duplicates: there may be more
                if k >= total or not more.any():
                    break
                todo, k = todo[more], min(4 * k, total)
        return found

    def retrieve(self, ids: Sequence[str], with_vectors: bool = True) -> list[Record]:
        return self.backend.retrieve(list(ids), with_vectors)

    def scroll(self, batch: int = 1024, with_vectors: bool = True) -> Iterator[list[Record]]:
        """All points, batch by batch (e.g. to copy a memory elsewhere); nothing for a memory never written."""
        if not self.backend.has_collection():
            return
        offset = None
        while True:
            recs, offset = self.backend.scroll(batch, offset, with_vectors)
            if recs:
                yield recs
            if offset is None:
                return

    def sample_pairs(self, n: int, seed: int = 0, progress: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
        """A uniform sample of `n` of the memory's pairs (all of them if it holds fewer): (point ids [n], image
        vectors [n, d], text vectors [n, d]), float32, in id order.

        RECO trains its fusion on unlabelled pairs; the memory's own are the natural ones (train with their ids,
        so that each pair's own point is left out of its neighbours). The draw ranks points by a hash of
        (seed, id): the same memory and seed give the same sample whatever order the engine returns points in,
        in one pass that keeps at most about 2n pairs' vectors (float32) in hand."""
        if n <= 0:
            raise ValueError(f"sample size must be positive, got {n}")
        salt = f"{seed}\x1f".encode()

        def rank(pid: str) -> int:
            return int.from_bytes(hashlib.blake2b(salt + pid.encode(), digest_size=8).digest(), "big")

        ranks = np.zeros(0, np.uint64)
        ids = np.zeros(0, object)
        vecs = {m: np.zeros((0, self.dim or 0), np.float32) for m in ("image", "text")}
        with progress_bar("sampling pairs", self.count(), progress) as advance:
            for recs in self.scroll(1024, with_vectors=True):  # vectors become arrays at once: 8 bytes a float
                ranks = np.concatenate([ranks, np.array([rank(r.id) for r in recs], np.uint64)])
                ids = np.concatenate([ids, np.array([r.id for r in recs], object)])
                for m in vecs:
                    vecs[m] = np.concatenate([vecs[m], np.asarray([r.vectors[m] for r in recs], np.float32)])
                if len(ranks) > 2 * n:
                    keep = np.argsort(ranks, kind="stable")[:n]
                    ranks, ids, vecs = ranks[keep], ids[keep], {m: v[keep] for m, v in vecs.items()}
                advance(len(recs))
        if not len(ids):
            raise ValueError(f"memory {self.cfg.location} holds no pairs to sample: ingest data first")
        _, first = np.unique(ids, return_index=True)  # a point scrolled twice (writes during the scroll) counts once
        keep = first[np.argsort(ranks[first], kind="stable")[:n]]
        keep = keep[np.argsort(ids[keep].astype(str), kind="stable")]
        return ids[keep].tolist(), vecs["image"][keep], vecs["text"][keep]

    def vector_columns(self, directory: str | Path, progress: bool = True, keep: int = 1) -> VectorColumns:
        """Every point's two vectors as memory-mapped float16 columns under `directory`, built by one scroll
        and reused while the memory is unchanged (keyed by its id and write version; `keep` versions kept).

        For many searches that need the hits' vectors (a training cache: N queries x k hits, often more
        vectors than the memory holds), asking the engine for ids only and gathering the vectors here with
        numpy avoids converting every hit's vectors to Python floats in the binding.
        """
        root = Path(directory)
        path = root / hashlib.sha1(f"{self.uid}|{self.write_version}".encode()).hexdigest()[:16]
        if not (path / "text.npy").exists():
            n, d = self.count(), self.dim
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f"{path.name}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            cols = {m: np.lib.format.open_memmap(tmp / f"{m}.npy", "w+", np.float16, (n, d)) for m in VECTOR_NAMES}
            ids, row = np.empty(n, dtype="U36"), 0
            with progress_bar("memory vectors", n, progress) as advance:
                for recs in self.scroll(4096, with_vectors=True):
                    e = row + len(recs)
                    ids[row:e] = [r.id for r in recs]
                    for m, col in cols.items():
                        col[row:e] = np.asarray([r.vectors[m] for r in recs], np.float32)
                    row = e
                    advance(len(recs))
            if row != n:
                raise MemoryError_(f"memory {self.cfg.location} changed while its vectors were read "
                                   f"({row} points read, {n} counted): retry when writes have stopped")
            for col in cols.values():
                col.flush()
            del cols
            np.save(tmp / "ids.npy", ids)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        os.utime(path)
        for old in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp")),
                          key=lambda p: p.stat().st_mtime, reverse=True)[max(keep, 1):]:
            shutil.rmtree(old, ignore_errors=True)
        return VectorColumns(np.load(path / "ids.npy"), {m: np.load(path / f"{m}.npy", mmap_mode="r")
                                                         for m in VECTOR_NAMES})

    def info(self) -> dict[str, Any]:
        """Count, dimension, encoder, backend and index status, applied migrations. No secrets."""
        st = self.backend.status()
        cfg = replace(self.cfg, api_key=None)
        return {
            "location": cfg.location,
            "collection": cfg.collection,
            "count": self.count(),
            "sources": self.sources(),
            "dim": self.dim,
            "encoder": self.encoder_record,
            "memory_uid": self.uid,
            "quantization": cfg.quantization,
            "write_version": self.write_version,
            # Edge: rows in the vector copy (more than points once points were rewritten), None without one
            "vector_copy_rows": getattr(getattr(self.backend, "copy", None), "rows", None),
            "migrations": [f"{e['version']:04d}_{e['name']}" for e in migrations.applied(self.backend)],
            "pending_migrations": self.pending_migrations(),
            "api_key_set": bool(self.cfg.api_key),
            **{f"index_{k}": v for k, v in st.items()},
        }

    # ------------------------------------------------------------------ backup and restore (embedded)
    def backup(self, dest: str | Path) -> int:
        """Copy this embedded memory (collection, ledger, vector copy) to the new directory `dest`, consistent:
        writes from this process wait while it copies (another process cannot hold the memory), so the copy is
        one acknowledged state. Searches go on meanwhile. Returns the number of points copied."""
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(f"{dest}: already exists; back up into a new directory")
        if self.cfg.kind != "edge":
            return self._snapshot_into(dest)
        root, name = Path(self.cfg.location), self.cfg.collection
        tmp = dest.with_name(f".{dest.name}.{_stage_tag()}.tmp")
        _warn_stale_stages(dest.parent, f".{dest.name}.")  # left by a backup that was killed
        try:
            with self._write_lock:
                self.backend.flush()
                points = self.count()
                if self.backend.has_collection():
                    self._ack_points(points)  # the copy's ledger says exactly which state it holds
                parts = [root / p for p in (name, f"{name}__meta", f"{name}__vectors") if (root / p).exists()]
                _check_room(dest, _tree_bytes(parts), root)
                tmp.mkdir(parents=True)
                for part in parts:
                    shutil.copytree(part, tmp / part.name, copy_function=_sparse_copy)
            durable.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no partial copy left beside DEST
            raise
        return points

    def snapshot(self) -> dict[str, Any]:
        """Server: Qdrant snapshots of the collection and of its ledger (`<collection>__meta`), taken and kept on
        the server (its snapshots directory). Writes from this process wait meanwhile; other processes' writes do
        not, so stop them for a consistent pair. Returns {"points", "snapshots": {collection: snapshot name},
        "urls": {collection: the REST URL that downloads it}}; `Memory.restore` recovers them."""
        if self.cfg.kind == "edge":
            raise ValueError(f"memory {self.cfg.location} is embedded: `Memory.backup(DEST)` copies it")
        if self.cfg.kind == "local":
            raise ValueError("memory :memory: lives in this process only, and qdrant-client's local mode has no "
                             "snapshots: copy it into a directory or a server with `reco copy` / `copy_memory`")
        client, base = self.backend.client, self.cfg.location.rstrip("/")
        with self._write_lock:
            points = self.count()
            names = {}
            for c in (self.cfg.collection, f"{self.cfg.collection}__meta"):
                if not self.backend._call(client.collection_exists, c):
                    raise FileNotFoundError(f"memory {base} has no collection {c!r}: nothing to snapshot")
                desc = client.create_snapshot(c, wait=True)  # not retried: a retry would take a second snapshot
                names[c] = desc.name
        return {"points": points, "snapshots": names,
                "urls": {c: f"{base}/collections/{c}/snapshots/{n}" for c, n in names.items()}}

    def _snapshot_into(self, dest: Path) -> int:
        """Server backup: the snapshots stay on the server; `dest` (a new directory) gets their manifest."""
        snap = self.snapshot()
        manifest = {"kind": "qdrant-snapshots", "location": self.cfg.location, "collection": self.cfg.collection,
                    **snap}
        text = json.dumps(manifest, indent=2)
        tmp = dest.with_name(f".{dest.name}.{_stage_tag()}.tmp")
        try:
            _check_room(dest, len(text.encode()) + 4096, None)
            tmp.mkdir(parents=True)
            (tmp / SNAPSHOT_MANIFEST).write_text(text)
            durable.fsync_path(tmp / SNAPSHOT_MANIFEST)
            durable.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return int(snap["points"])

    @classmethod
    def restore(cls, backup: str | Path, location: str | Path, collection: str = "reco_memory", *,
                ledger_snapshot: str | None = None, **settings: Any) -> Restored:
        """Bring a `backup` back into `location` (a directory without that collection) and verify it: opening
        checks the engine's count against the count the backup's ledger acknowledged. Returns a `Restored`: the
        count, and whether it was verified against one exact count the backup recorded (see `Restored`).

        Into a directory, all or nothing: every part is copied into one staging directory inside `location` and
        opened (verified) there, then renamed into place; a failure removes whatever this restore had put there.

        `location` a server URL: `backup` is the directory `backup` wrote for a server (its manifest names the
        snapshots and the count to verify), or one snapshot location of the collection (http(s):// URL, or
        file:// path on the server; nothing to verify the count against), with `ledger_snapshot` for its `__meta`
        collection (else the encoder record and ledger start empty). The server fetches the snapshots itself
        (`recover_snapshot`; the API key goes only to URLs on that server); `settings` are `MemoryConfig` fields
        (api_key, TLS, ...)."""
        if MemoryConfig(location=str(location)).kind != "edge":
            return cls._recover(str(backup), str(location), collection, ledger_snapshot, settings)
        backup, root = Path(backup), Path(location)
        if (backup / SNAPSHOT_MANIFEST).exists():
            raise ValueError(f"{backup}: a backup of a server memory (Qdrant snapshots, see {SNAPSHOT_MANIFEST}); "
                             "restore it into a server (--memory http://HOST:6333), or `reco copy` from there")
        if not (backup / f"{collection}__meta").exists():
            raise FileNotFoundError(f"{backup}: not a backup of collection {collection!r} (no {collection}__meta)")
        parts = [collection, f"{collection}__meta", f"{collection}__vectors"]
        held = [p for p in parts if (root / p).exists()]
        if held:
            raise FileExistsError(f"{root}: already holds collection {collection!r} ({', '.join(held)}); restore "
                                  "into another directory or move it away first")
        root.mkdir(parents=True, exist_ok=True)
        stage = root / f".{collection}.restore.{_stage_tag()}.tmp"
        _warn_stale_stages(root, f".{collection}.restore.")  # left by a restore that was killed
        copied = [backup / p for p in parts if (backup / p).exists()]
        _check_room(stage, _tree_bytes(copied), root, f"restore of backup {backup} into {root}",
                    "restore into a directory on another disk")
        published: list[str] = []
        try:
            stage.mkdir()
            for part in parts:
                if (backup / part).exists():
                    shutil.copytree(backup / part, stage / part, copy_function=_sparse_copy)
            durable.fsync_path(stage)
            done = cls._verify_staged(stage, collection, backup)
            for part in parts:
                if not (stage / part).exists():
                    continue
                if (root / part).exists():
                    raise FileExistsError(f"{root}: {part} appeared there while restoring (another process?); "
                                          "nothing of the backup was left there")
                try:
                    os.rename(stage / part, root / part)
                except OSError as e:
                    raise OSError(e.errno, f"restore into {root}: could not move {part} into place ({e.strerror}); "
                                  "nothing of the backup was left there: fix that and run the restore again") from e
                published.append(part)
            durable.fsync_dir(root)
        except BaseException:
            for part in published:  # only what this restore put there
                shutil.rmtree(root / part, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return done

    @classmethod
    def _verify_staged(cls, stage: Path, collection: str, backup: Path) -> Restored:
        """Open the restored copy where it was staged: the count and sample checks verify it before it is published.
        A refusal names BACKUP (the staging directory is removed): the stage is only its copy."""
        missing, root = not (stage / collection).exists(), stage.parent
        nothing = f"nothing was restored into {root}"
        try:
            with cls.open(str(stage), collection=collection, auto_index=False) as mem:
                n, check = mem.count(), mem.count_check
        except MemoryDamagedError as e:
            counts, problem = getattr(e, "counts", None), getattr(e, "problem", None)
            opt = "" if collection == "reco_memory" else f" --collection {collection}"
            adopt = (f"or, to restore it as it is deliberately, adopt the count on a copy of the backup "
                     f"(`cp -r {backup} COPY_OF_BACKUP && reco doctor --memory COPY_OF_BACKUP{opt} --accept-count`) "
                     f"and restore that copy (`reco restore COPY_OF_BACKUP --memory {root}{opt}`)")
            if missing and counts is not None:  # a ledger that acknowledged points, without the collection
                raise MemoryDamagedError(
                    f"backup {backup}: no {collection}/ directory, but its ledger acknowledged {counts[1]} points; an "
                    f"incomplete backup, {nothing}: restore from a complete backup, {adopt} (an empty memory)") from e
            if counts is not None:
                raise MemoryDamagedError(
                    f"backup {backup}: its collection holds {counts[0]:,} points, but its ledger acknowledged "
                    f"{counts[1]} (an incomplete backup, or parts of different backups); {nothing}: restore another "
                    f"backup, {adopt}") from e
            if problem is not None:
                raise MemoryDamagedError(
                    f"backup {backup}: {problem}; {nothing}: restore another backup, or check every point of a copy "
                    f"of it (`cp -r {backup} COPY_OF_BACKUP && reco doctor --memory COPY_OF_BACKUP`)") from e
            raise MemoryDamagedError(f"backup {backup}: {_named(e, stage, backup)}; {nothing}") from e
        except MemoryFullError as e:  # the disk is ROOT's: the stage is inside it
            raise MemoryFullError(f"restore of backup {backup}: {_named(e, stage, root)}; {nothing}") from e
        except MemoryError_ as e:
            raise type(e)(f"restore of backup {backup}: {_named(e, stage, backup)}; {nothing}") from e
        except OSError as e:
            said = f"restore of backup {backup}: {_named(e, stage, backup)}; {nothing}"
            raise (OSError(e.errno, said) if e.errno is not None else OSError(said)) from e
        except ValueError as e:
            raise ValueError(f"restore of backup {backup}: {_named(e, stage, backup)}; {nothing}") from e
        if check == "exact":
            return Restored(n, True)
        why = ("its ledger holds only a range of counts (a copy of a memory that was open, made without "
               "`reco backup`)" if check == "range" else "its ledger records no count (written by an older version)")
        return Restored(n, False, why)

    @classmethod
    def _recover(cls, backup: str, location: str, collection: str, ledger_snapshot: str | None,
                 settings: dict[str, Any]) -> Restored:
        """Server restore: recover the snapshots into collections that do not exist yet, then verify the count."""
        from urllib.parse import urlsplit

        from qdrant_client import QdrantClient

        cfg = MemoryConfig(location=location, collection=collection, **settings).with_env()
        if cfg.kind == "local":
            raise ValueError("memory :memory: cannot be restored into: qdrant-client's local mode has no snapshots; "
                             "restore into a directory or a server URL")
        expected, meta = None, f"{collection}__meta"
        if (Path(backup) / SNAPSHOT_MANIFEST).exists():
            manifest = json.loads((Path(backup) / SNAPSHOT_MANIFEST).read_text())
            urls = manifest["urls"]
            was = manifest["collection"]
            expected = int(manifest["points"])
            sources = {collection: urls[was], meta: urls[f"{was}__meta"]}
        elif backup.startswith(("http://", "https://", "file://")):
            sources = {collection: backup, **({meta: ledger_snapshot} if ledger_snapshot else {})}
        elif Path(backup).exists():
            raise FileNotFoundError(f"{backup}: not a backup of a server memory (no {SNAPSHOT_MANIFEST}); an "
                                    "embedded backup is restored into a directory (--memory DIR)")
        else:
            raise FileNotFoundError(f"{backup}: no such backup directory, and not a snapshot location "
                                    "(http(s):// URL, or file:// path on the server)")

        def host(url: str) -> tuple[str, int | None] | None:
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                return None
            return u.hostname.lower(), u.port or (443 if u.scheme == "https" else 80)

        server = host(cfg.location)
        withheld: list[str] = []  # hosts of snapshot URLs the API key was not sent to (not the server's)
        client = QdrantClient(**cfg.client_kwargs())
        try:
            held = [c for c in sources if client.collection_exists(c)] + (
                [meta] if meta not in sources and client.collection_exists(meta) else [])
            if held:
                raise FileExistsError(f"{location} already holds collection {held[0]!r}; restore into another "
                                      "--collection or delete it first")
            started: list[str] = []  # collections this restore began to recover (only these are rolled back)
            try:  # all or nothing: none of these collections existed (checked above)
                for c, where in sources.items():
                    # the server fetches `where` itself, sending this key: only to the server's own URLs
                    key = cfg.api_key if server is not None and host(where) == server else None
                    if cfg.api_key and key is None and host(where) is not None:
                        withheld.append(f"{host(where)[0]}:{host(where)[1]}")
                    started.append(c)
                    client.recover_snapshot(c, where, api_key=key, wait=True)
                if meta not in sources:
                    started.append(meta)  # opening creates the ledger collection when no snapshot brought one
                with cls.open(location, collection=collection, **settings) as mem:
                    n = mem.count()
                if expected is not None and n != expected:
                    raise MemoryDamagedError(f"memory {location} / {collection}: recovered {n:,} points, but the "
                                             f"backup {backup} holds {expected:,} (a snapshot short or damaged)")
            except BaseException as e:
                said = cls._drop_recovered(client, started, location)
                if isinstance(e, (KeyboardInterrupt, SystemExit)) or "timed out" in str(e).lower():
                    said += ("; if the server was still recovering a snapshot when this stopped, it may finish "
                             f"later: check with `reco info --memory {location} --collection {collection}`")
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                if withheld and server is not None:
                    said += (f"; the API key was not sent to {', '.join(sorted(set(withheld)))} (not the server's "
                             f"own host, {server[0]}:{server[1]}): if the snapshot needs it, give its URL with the "
                             "server's own host name and port, or its file:// path on the server")
                if isinstance(e, MemoryError_):
                    raise type(e)(f"{e}; {said}") from e
                raise MemoryError_(f"restore of {backup} into {location} / {collection} failed ({type(e).__name__}: "
                                   f"{e}); {said}") from e
        finally:
            client.close()
        if expected is None:
            return Restored(n, False, f"a snapshot location, without the manifest ({SNAPSHOT_MANIFEST}) that `reco "
                                      "backup` writes")
        return Restored(n, True)

    @staticmethod
    def _drop_recovered(client: Any, names: Sequence[str], location: str) -> str:
        """Delete the collections a failed server restore created (none existed before it); says what happened."""
        dropped, left = [], []
        for c in dict.fromkeys(names):
            try:
                if client.collection_exists(c):
                    client.delete_collection(c)
                    dropped.append(c)
            except Exception as x:  # noqa: BLE001 - said, with what to do
                left.append(f"{c} ({type(x).__name__}: {x})")
        if left:
            return (f"could not delete what this restore recovered: {', '.join(left)}; delete those collections on "
                    f"{location} before restoring again (a restore into existing collections is refused), or restore "
                    "into another --collection")
        done = f"deleted the collections this restore had recovered ({', '.join(dropped)})" if dropped else \
            "nothing had been recovered"
        return (f"{done}: nothing of it was left on {location}; restore again from another backup or snapshot, "
                "or from this one once the cause above is fixed")

    # ------------------------------------------------------------------ ledger for resumable jobs
    def get_state(self, key: str) -> Any:
        return self.backend.meta_get(f"state:{key}")

    def set_state(self, key: str, value: Any) -> None:
        with self._write_lock:
            self.backend.meta_set(f"state:{key}", value)


def _tree_bytes(paths: Sequence[Path]) -> int:
    """Bytes a copy of these directories takes on disk: allocated blocks, as `stored_bytes` counts them (the
    engine's preallocated files are sparse, and `_sparse_copy` keeps them so); files that vanish count nothing."""
    total = 0
    for top in paths:
        for f in top.rglob("*"):
            try:
                total += f.stat().st_blocks * 512 if f.is_file() else 4096
            except FileNotFoundError:
                pass
    return total


def _sparse_copy(src: str, dst: str, *, follow_symlinks: bool = True) -> str:
    """`shutil.copy2` that keeps holes (as `cp --sparse=always` does for them): only the data ranges of `src`
    (SEEK_DATA/SEEK_HOLE) are written, so the engine's preallocated 32 MiB write-ahead-log segments cost what they
    hold, not their size. Falls back to a full copy where the filesystem cannot say where the holes are."""
    if (not follow_symlinks and os.path.islink(src)) or not hasattr(os, "SEEK_DATA") or not os.path.isfile(src):
        return shutil.copy2(src, dst, follow_symlinks=follow_symlinks)
    chunk = 2**20
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        os.fsync(fi.fileno())  # some filesystems report data not yet synced as holes
        before = os.fstat(fi.fileno())
        size = before.st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
                end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    break
                start, end = pos, size  # SEEK_DATA unsupported here: copy the rest whole
            while start < end:
                buf = os.pread(fi.fileno(), min(chunk, end - start), start)
                if not buf:
                    break
                os.pwrite(fo.fileno(), buf, start)
                start += len(buf)
            pos = end
        os.ftruncate(fo.fileno(), size)  # the holes at the end keep the file's length
        after = os.fstat(fi.fileno())
        if (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns):
            raise OSError(errno.EAGAIN, f"{src} changed while it was copied ({size:,} -> {after.st_size:,} bytes); "
                                        "the copy is not consistent: try again")
    shutil.copystat(src, dst)
    return dst


def _stage_tag() -> str:
    """`pid-random`: a staging name no other backup or restore (another thread, or a process elsewhere sharing the
    disk) uses at the same time."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _warn_stale_stages(parent: Path, prefix: str) -> None:
    """Say which staging directories `{prefix}{pid}-{random}.tmp` in `parent` were left by a backup or restore
    whose process is gone (killed): hidden, they would pile up. They are not removed: a process in another pid
    namespace or on another host sharing the disk may look gone while its copy goes on."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:-[0-9a-f]{8})?\.tmp")
    try:
        names = [e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    stale = []
    for name in names:
        m = pattern.fullmatch(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive: its copy may still be going on
        except ProcessLookupError:
            stale.append(str(parent / name))
        except (OSError, ValueError, OverflowError):
            continue  # not ours to judge (another user's process, a platform without signal 0)
    if stale:
        warnings.warn(f"{', '.join(stale)}: left by a backup or restore that was interrupted (its process is gone "
                      "here); delete once no backup or restore is running there", stacklevel=3)


def _check_room(dest: Path, need: int, memory_root: Path | None, what: str = "",
                elsewhere: str = "back up to another disk") -> None:
    """Refuse (before copying anything) a backup (or restore: `what`) that would not fit on DEST's disk; on the
    memory's own disk the engine's reserve (`DISK_RESERVE`) must stay free too."""
    probe = dest.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    same = memory_root is not None and os.stat(probe).st_dev == os.stat(memory_root).st_dev
    reserve = DISK_RESERVE if same else 0
    if free < need + reserve:
        mib = 2**20
        on = (f" plus the {reserve / mib:.0f} MiB the memory's engine keeps free for its write-ahead log"
              + ("" if what else " (DEST is on the memory's disk)")) if same else ""
        raise MemoryFullError(f"{what or f'backup {dest}'}: {free / mib:,.1f} MiB free on its disk, the copy needs "
                              f"about {need / mib:,.1f} MiB{on}; nothing was copied: free space there, or {elsewhere}")


def _named(e: BaseException, stage: Path, name: Path) -> str:
    """An error's message with the (removed) staging directory replaced by what it is a copy of."""
    return str(e).replace(str(stage), str(name))


def _said_count(rec: Sequence[int]) -> str:
    """[low, high] acknowledged point counts, said: "1,200" or "between 100 and 200"."""
    return f"{int(rec[0]):,}" if rec[0] == rec[1] else f"between {int(rec[0]):,} and {int(rec[1]):,}"


def _content_key(vec: np.ndarray, caption: str) -> str:
    h = hashlib.sha1(vec.tobytes())
    h.update(caption.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _to_neighbours(hits: Hits, k: int, dim: int | None, key_dim: int | None = None) -> Neighbours:
    """Backend `Hits` -> `Neighbours` [B, k], missing hits padded (id "", score -inf, zero vector);
    vectors re-normalised (quantised storage may drift)."""
    b = len(hits.ids)
    lengths = np.array([len(r) for r in hits.ids], np.int64)
    have = np.arange(k)[None, :] < lengths[:, None]  # [B, k]: where a hit exists
    full = bool(have.all())

    def pad(rows: list[list[Any]], fill: Any, dtype: Any) -> np.ndarray:
        if full:
            return np.array(rows, dtype).reshape(b, k)
        out = np.full((b, k), fill, dtype)
        out[have] = np.array([x for r in rows for x in r], dtype)
        return out

    def stack(flat: np.ndarray | None, d: int | None) -> np.ndarray | None:
        if not d:
            return None
        if full:
            out = flat.reshape(b, k, d)
        else:
            out = np.zeros((b, k, d), np.float32)
            if flat is not None and flat.size:
                out[have] = flat.reshape(-1, d)
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    ids = pad(hits.ids, "", object).astype(str)
    payloads = [row + [{} for _ in range(k - len(row))] for row in hits.payloads] if not full else hits.payloads
    return Neighbours(ids, pad(hits.scores, -np.inf, np.float32), stack(hits.vectors, dim), payloads,
                      stack(hits.keys, key_dim))
