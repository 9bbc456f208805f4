"""The memory: image-text pairs in Qdrant, added and searched in batches. `Memory` spans a few files, one job each:
`ledger.py` (write versions, counts checked on opening), `indexing.py`, `backup.py`, `points.py` (point ids, checked
embeddings, `Neighbours`), `vector_columns.py`; `backends/` holds the engines."""

from __future__ import annotations

import hashlib
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import migrations
from ._deprecated import renamed, renamed_argument
from .backends import (
    VECTOR_NAMES,
    Backend,
    Hits,
    MemoryDamagedError,
    MemoryFullError,
    MemoryInUseError,
    MemoryUnavailableError,
    RecoMemoryError,
    Record,
    open_backend,
)
from .backup import SNAPSHOT_MANIFEST, BackupRestore, Restored
from .config import MemoryConfig
from .indexing import EXACT_SEARCH_BELOW, Indexing, IndexPostponedWarning, index_due
from .ledger import OPEN_SAMPLE, WRITE_VERSION_KEY, Ledger
from .points import EncoderMismatchError, Neighbours, _content_key, _to_neighbours, point_id, validate_embeddings
from .progress import progress_bar
from .vector_columns import VectorColumns, vector_columns
from .vector_copy import COPY_FIELD

__all__ = ["Memory", "Neighbours", "Restored", "VectorColumns", "EncoderMismatchError", "UnverifiedEncoderWarning",
           "IndexPostponedWarning", "MemoryInUseError", "MemoryDamagedError", "MemoryFullError",
           "MemoryUnavailableError", "RecoMemoryError", "point_id", "validate_embeddings", "index_due",
           "EXACT_SEARCH_BELOW", "OPEN_SAMPLE", "SNAPSHOT_MANIFEST", "WRITE_VERSION_KEY"]

ENCODER_KEY = "encoder"
UID_KEY = "memory_uid"
LAYOUT_KEY = "layout"  # collection settings fixed at creation (see migrations 0001 and 0003)
COLLECTION_UID_KEY = "collection_uid"  # new each time the collection is (re)created: keys the ingest ledger
UNSPECIFIED = "unspecified"  # encoder id recorded when vectors arrive without one
RESERVED_PAYLOAD = ("caption", "source", "key", COPY_FIELD)


class UnverifiedEncoderWarning(UserWarning):
    """The memory records no encoder id, so an encoder used with it cannot be checked."""


class Memory(Ledger, Indexing, BackupRestore):
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
        self._wrote = False  # exclusive storage: written since the ledger last acknowledged one count (see close)
        # exclusive storage, on opening: what the ledger acknowledged ("exact": one count, "range": a write was in
        # progress, "none": nothing recorded), and (was, now) when `accept_count` adopted another count
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
            if mem.backend.exclusive and check_count:
                if mem.backend.has_collection():
                    mem._check_points(accept_count, check_sample)
                else:
                    mem._check_collection_gone(accept_count)
            if encoder is not None:
                mem.check_encoder(getattr(encoder, "id", encoder), getattr(encoder, "dim", None))
            if migrate and (mem.dim is not None or mem.backend.has_collection()):
                mem.migrate()
            mem._auto_index = auto_index and not mem.backend.indexes_itself
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
            chunks = [(pids[s : s + step], img[s : s + step], txt[s : s + step], out[s : s + step])
                      for s in range(0, n, step)]
            workers = min(self.backend.upload_workers, len(chunks))
            if workers <= 1:
                for chunk in chunks:
                    self.backend.upsert(*chunk)
                    self._unchecked_writes += len(chunk[0])
            else:  # the ids are unique, so the requests commute; the call returns when every one is stored
                with ThreadPoolExecutor(workers, thread_name_prefix="reco-upsert") as pool:
                    futures = [pool.submit(self.backend.upsert, *chunk) for chunk in chunks]
                    try:  # the first error raises at once (waiting on futures in order would let queued ones run)
                        wait(futures, return_when=FIRST_EXCEPTION)
                        error = next((f.exception() for f in futures if f.done() and f.exception()), None)
                        if error is not None:
                            raise error
                    finally:  # on an error: queued requests never start, running ones end before we raise
                        pool.shutdown(wait=True, cancel_futures=True)
                        self._unchecked_writes += sum(len(c[0]) for c, f in zip(chunks, futures)
                                                      if not f.cancelled() and f.exception() is None)
        return pids

    def delete(self, ids: Sequence[str]) -> None:
        """Remove points by id."""
        if ids:
            with self._write_lock:
                self._bump_write_version(-len(ids), 0)
                self.backend.delete(list(ids))


    def flush(self) -> None:
        self.backend.flush()

    # ------------------------------------------------------------------ reading
    def count(self, source: str | None = None) -> int:
        """Points in the memory (of one `source` only, when given)."""
        return self.backend.count(source)

    def sources(self) -> dict[str, int]:
        """Points per source (the `source` each pair was ingested under), largest first."""
        return dict(sorted(self.backend.sources().items(), key=lambda kv: (-kv[1], kv[0])))

    def collections(self) -> dict[str, Any]:
        """Points per collection at this memory's location, this one included (None: held by another process; on
        Edge an `UnreadableCollection`, or an `UncountedCollection` when the disk is too full to load it)."""
        return dict(sorted({**self.backend.collections(), self.cfg.collection: self.count()}.items()))

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of point `ids` already stored (an upsert of these replaces them)."""
        if not ids or not self.backend.has_collection():
            return set()
        return {r.id for r in self.backend.retrieve(list(ids), with_vectors=False)}

    def search(self, queries: np.ndarray, modality: str = "image", k: int = 10,
               return_modality: str | None = "text", exact: bool = False,
               batch_size: int = 256, with_payload: bool = True, with_searched_vectors: bool = False,
               hnsw_ef: int | None = None, with_keys: bool | None = None) -> Neighbours:
        """Nearest neighbours of each query among the memory's `modality` vectors.

        Args:
            queries: [B, d] or [d] query embeddings (normalised here).
            modality: which named vectors to search, "image" or "text".
            k: neighbours per query.
            return_modality: which vector of each hit to return ("text", "image" or None).
            exact: brute-force search instead of the index (ground truth for recall).
            batch_size: queries per request to Qdrant (one batched call each).
            with_payload: return captions and metadata (False when only vectors are needed: faster).
            with_searched_vectors: also return each hit's vector in the searched modality (`searched_vectors`).
            hnsw_ef: HNSW search width for this call (default: the memory's `hnsw_ef`).
            with_keys: the deprecated name of `with_searched_vectors` (one release).
        Returns:
            `Neighbours` with ids/scores [B, k], vectors [B, k, d], payloads.
        """
        with_searched_vectors = renamed_argument("with_keys", with_keys, "with_searched_vectors", with_searched_vectors,
                                                 False)
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
            raise RecoMemoryError(f"memory {self.cfg.location} is empty: ingest image-text pairs first")
        hits = Hits.concat([self.backend.search(q[s : s + batch_size], modality, k, return_modality, exact,
                                                with_payload, with_searched_vectors, hnsw_ef)
                            for s in range(0, len(q), batch_size)])
        if any(len(row) < k for row in hits.ids):  # counted only then: a count per search costs ~5% at 200k points
            total = self.count()
            if total == 0:
                raise RecoMemoryError(f"memory {self.cfg.location} is empty: ingest image-text pairs first")
            if k > total:
                raise ValueError(f"k={k} neighbours asked, but the memory holds {total} points")
        d = q.shape[1]
        return _to_neighbours(hits, k, d if return_modality else None, d if with_searched_vectors else None)

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
        """Every point's two vectors, gathered by point id with numpy: from the memory's own vector copy where it can be
        trusted, else from a copy written under `directory` (reused while the memory is unchanged, `keep` versions
        kept); see `vector_columns.py`."""
        return vector_columns(self, directory, progress, keep)

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
            "vector_copy_rows": self.backend.vector_copy_rows(),  # more than points once points were rewritten
            "migrations": [f"{e['version']:04d}_{e['name']}" for e in migrations.applied(self.backend)],
            "pending_migrations": self.pending_migrations(),
            "api_key_set": bool(self.cfg.api_key),
            **{f"index_{k}": v for k, v in st.items()},
        }


    # ------------------------------------------------------------------ ledger for resumable jobs
    def get_state(self, key: str) -> Any:
        return self.backend.meta_get(f"state:{key}")

    def set_state(self, key: str, value: Any) -> None:
        with self._write_lock:
            self.backend.meta_set(f"state:{key}", value)

__getattr__ = renamed("reco_qdrant.memory", {"MemoryError_": ("RecoMemoryError", RecoMemoryError)})
