"""The two ways we talk to Qdrant, behind one narrow protocol.

`EdgeBackend` runs Qdrant's engine in-process (Qdrant Edge), persistent in a directory: the
embedded default. `ServerBackend` talks to a Qdrant server over gRPC with qdrant-client; over
`QdrantClient(":memory:")` it is also the in-process stand-in for the server in tests.
Both store one point per image-text pair with two named vectors, `image` and `text`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from .config import MemoryConfig
from .vector_copy import COPY_FIELD, SCORE_TOLERANCE, VectorCopy

VECTOR_NAMES = ("image", "text")
_META_VECTOR = "_"
T = TypeVar("T")


class MemoryError_(RuntimeError):
    """Base class of the memory's errors (named so it does not shadow the builtin MemoryError)."""


class MemoryInUseError(MemoryError_):
    """Another process holds the embedded memory directory."""


class MemoryUnavailableError(MemoryError_):
    """The Qdrant server cannot be reached (after bounded retries)."""


class MemoryFullError(MemoryError_):
    """The disk of an embedded memory has too little free space for a write or an index build."""


# Free disk space an embedded memory keeps in reserve: the engine writes through memory maps into files it
# preallocates (32 MiB write-ahead-log segments), and a full disk there kills the process with SIGBUS
# instead of raising an error, so writes and index builds are refused while less than this would remain.
DISK_RESERVE = 256 * 2**20


class MemoryDamagedError(MemoryError_):
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
    keys: np.ndarray | None = None  # [hits, d] the same for the vector that was searched (with_key=True)

    @classmethod
    def of(cls, rows: list[Any], return_vector: str | None, using: str, with_key: bool) -> Hits:
        """From the engine's (or qdrant-client's) rows of scored points."""
        flat = [p for row in rows for p in row]

        def column(name: str | None) -> np.ndarray | None:
            return np.array([_named(p.vector, name) for p in flat], np.float32) if name else None

        return cls([[str(p.id) for p in row] for row in rows], [[p.score for p in row] for row in rows],
                   [[p.payload or {} for p in row] for row in rows], column(return_vector),
                   column(using if with_key else None))

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
                   cat([h.keys for h in parts]))


@dataclass
class Record:
    id: str
    vectors: dict[str, list[float]]
    payload: dict[str, Any]
    copy_entry: list[int] | None = None  # Edge: [row, crc] of the point in the vector copy (None: written without)


class Backend(Protocol):
    """What `Memory` needs from a Qdrant deployment. Vectors are float32 [N, d]."""

    def has_collection(self) -> bool: ...
    def create_collection(self, dim: int, cfg: MemoryConfig) -> None: ...
    def create_payload_index(self, field: str) -> None: ...
    def upsert(self, ids: list[str], image: np.ndarray, text: np.ndarray, payloads: list[dict]) -> None: ...
    def search(self, queries: np.ndarray, using: str, k: int, return_vector: str | None,
               exact: bool = False, with_payload: bool = True, with_key: bool = False,
               hnsw_ef: int | None = None) -> Hits: ...
    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Record]: ...
    def scroll(self, limit: int, offset: Any, with_vectors: bool) -> tuple[list[Record], Any]: ...
    def delete(self, ids: list[str]) -> None: ...
    def count(self, source: str | None = None) -> int: ...
    def sources(self, limit: int = 10_000) -> dict[str, int]: ...
    def stored_quantization(self) -> str | None: ...
    def optimize(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...
    def meta_get(self, key: str) -> Any: ...
    def meta_set(self, key: str, value: Any) -> None: ...
    def close(self) -> None: ...


def _record(r: Any) -> Record:
    payload = dict(r.payload or {})
    return Record(str(r.id), dict(r.vector or {}), payload, payload.pop(COPY_FIELD, None))


def _meta_id(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"reco-meta:{key}"))


def _named(vec: Any, name: str) -> list[float] | None:
    if vec is None:
        return None
    return vec.get(name) if isinstance(vec, dict) else vec


def _vector_names(return_vector: str | None, using: str, with_key: bool) -> list[str] | bool:
    names = list(dict.fromkeys(n for n in (return_vector, using if with_key else None) if n))
    return names or False


# --------------------------------------------------------------------------- Qdrant Edge


class EdgeBackend:
    """Qdrant Edge shards in a directory: `<dir>/<collection>/` (data), `<dir>/<collection>__meta/` (ledger),
    and `<dir>/<collection>__vectors/` (a float32 copy of the vectors for fast hits; see `vector_copy.py`)."""

    def __init__(self, path: str | os.PathLike, cfg: MemoryConfig, repair_ledger: bool = False) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.cfg = cfg
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / f".{cfg.collection}.lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise MemoryInUseError(
                f"memory directory {self.root} is in use by another process; an embedded memory "
                "is opened by one process at a time (use a Qdrant server for concurrent access)"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self.data_path = self.root / cfg.collection
        self.copy_path = self.root / f"{cfg.collection}__vectors"
        meta_path = self.root / f"{cfg.collection}__meta"
        self.meta = self.shard = self.copy = None
        self.copy_doubt: str | None = None  # why the copy was found out of step with the engine (then unused)
        try:
            if self._exists(self.data_path) and not self._exists(meta_path) and not repair_ledger:
                raise MemoryDamagedError(
                    f"memory {self.root}: the ledger {meta_path} is missing while the collection {self.data_path} is "
                    "there (the encoder record, settings and migration ledger live in it): restore it from a copy, or "
                    f"rebuild it from the collection with `reco doctor --memory {self.root} --repair-ledger` (the "
                    "encoder is then unrecorded until `reco migrate --encoder-id ID`)")
            free = self.free_bytes()
            if free < DISK_RESERVE:  # opening maps and fills write-ahead-log segments (measured ~100 MiB)
                raise MemoryFullError(f"memory {self.root}: {free / 2**20:,.0f} MiB free on its disk; "
                                      f"opening it needs at least {DISK_RESERVE / 2**20:.0f} MiB (the engine's "
                                      "write-ahead log; a full disk there would kill the process): free space first")
            self.meta = self._open_or_create(meta_path, {_META_VECTOR: 1})
            self.shard = self._load(self.data_path) if self._exists(self.data_path) else None
            if self.shard is not None:  # a first point read whole: damage the load did not notice shows here
                self.scroll(1, None, True)
                self.copy = VectorCopy.open(self.copy_path, self._dim(), VECTOR_NAMES)
        except BaseException:
            for s in (self.shard, self.meta):  # what did open is closed: a later open here is not "in use"
                if s is not None:
                    s.close()
            self._release_lock()
            raise

    # -- helpers
    @staticmethod
    def _exists(path: Path) -> bool:
        return (path / "edge_config.json").exists() or (path / "segments").exists()

    def _load(self, path: Path) -> Any:
        try:
            return self.qe.EdgeShard.load(str(path))
        except BaseException as e:  # the engine reports a held WAL as a generic runtime error
            if not _engine_failure(e):
                raise
            if "WouldBlock" in str(e):
                raise MemoryInUseError(f"{path} is in use by another process") from e
            where = re.search(re.escape(str(path)) + r"[^\s:\"']*", " ".join(str(e).split()))
            unreadable = where.group(0) if where else path
            raise self._damaged(e, f" cannot be opened: the engine cannot read {unreadable}") from e

    def _open_or_create(self, path: Path, dims: dict[str, int]) -> Any:
        if self._exists(path):
            return self._load(path)
        qe = self.qe
        vectors = {n: qe.EdgeVectorParams(size=d, distance=qe.Distance.Cosine) for n, d in dims.items()}
        return qe.EdgeShard.create(str(path), qe.EdgeConfig(vectors=vectors))

    def _dim(self) -> int:
        cfg = json.loads((self.data_path / "edge_config.json").read_text())
        return int(cfg["vectors"][VECTOR_NAMES[0]]["size"])

    def _require(self) -> Any:
        if self.shard is None:
            raise MemoryError_(f"{self.root} holds no memory collection yet: ingest data or run `reco migrate`")
        return self.shard

    def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A read from the engine; its failures on our well-formed requests mean files it cannot read."""
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if not _engine_failure(e) or isinstance(e, MemoryError_):
                raise
            raise self._damaged(e, ": the engine failed to read it") from e

    def _damaged(self, e: BaseException, what: str) -> MemoryDamagedError:
        """One line: the memory, what failed, the engine's words, and how to recover."""
        said = " ".join(str(e).split())[:300]
        return MemoryDamagedError(f"memory {self.root}{what} ({said}); " + _RECOVER.format(root=self.root))

    # -- protocol
    def has_collection(self) -> bool:
        return self.shard is not None

    def create_collection(self, dim: int, cfg: MemoryConfig) -> None:
        qe = self.qe
        quant = None
        if cfg.quantization == "int8":
            quant = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
        elif cfg.quantization is not None:
            raise ValueError(f"quantization {cfg.quantization!r} not supported: expected None or 'int8'")
        vp = {n: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine, on_disk=cfg.on_disk)
              for n in VECTOR_NAMES}
        hnsw = qe.HnswIndexConfig(m=cfg.hnsw_m, ef_construct=cfg.hnsw_ef_construct,
                                  full_scan_threshold=cfg.full_scan_threshold)
        config = qe.EdgeConfig(vectors=vp, hnsw_config=hnsw, quantization_config=quant,
                               on_disk_payload=cfg.on_disk_payload)
        self.shard = qe.EdgeShard.create(str(self.data_path), config)
        if cfg.vector_copy:
            self.copy = VectorCopy.create(self.copy_path, dim, VECTOR_NAMES)
        else:
            shutil.rmtree(self.copy_path, ignore_errors=True)  # one left by an earlier collection

    def create_payload_index(self, field: str) -> None:
        qe = self.qe
        self._require().update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))

    def upsert(self, ids: list[str], image: np.ndarray, text: np.ndarray, payloads: list[dict]) -> None:
        qe = self.qe
        if self.copy is not None:  # rows first: a point never names a row not yet written for it
            try:
                entries = self.copy.append({"image": image, "text": text})
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise MemoryFullError(f"memory {self.root}: the disk filled while writing {len(ids)} points' vectors "
                                      f"to {self.copy_path}; free space and run it again: what was stored is intact "
                                      "and an ingest resumes") from None
            payloads = [{**p, COPY_FIELD: e} for p, e in zip(payloads, entries)]
        im, tx = image.tolist(), text.tolist()
        points = [qe.Point(i, {"image": a, "text": b}, p) for i, a, b, p in zip(ids, im, tx, payloads)]
        self._require().update(qe.UpdateOperation.upsert_points(points))

    def search(self, queries: np.ndarray, using: str, k: int, return_vector: str | None,
               exact: bool = False, with_payload: bool = True, with_key: bool = False,
               hnsw_ef: int | None = None) -> Hits:
        qe = self.qe
        quant = (qe.QuantizationSearchParams(ignore=exact, rescore=True, oversampling=2.0)
                 if self.cfg.quantization else None)
        params = qe.SearchParams(hnsw_ef=max(hnsw_ef or self.cfg.hnsw_ef, k), exact=exact, quantization=quant)
        with_vector = _vector_names(return_vector, using, with_key)

        def query(with_vector: list[str] | bool, with_payload: bool | list[str]) -> list[Any]:
            reqs = [qe.QueryRequest(limit=k, query=qe.Query.Nearest(q, using=using), with_vector=with_vector,
                                    with_payload=with_payload, params=params) for q in queries.tolist()]
            return self._read(self._require().query_batch, qe.QueryBatchRequest(reqs))

        if with_vector and self.copy is not None and self.copy_doubt is None:
            hits = self._from_copy(query(False, True if with_payload else [COPY_FIELD]), queries, using,
                                   return_vector, with_key)
            if hits is not None:  # (payloads asked only for the entry are {} once it is taken out)
                return hits
        hits = Hits.of(query(with_vector, with_payload), return_vector, using, with_key)
        for p in (p for row in hits.payloads for p in row):
            p.pop(COPY_FIELD, None)
        return hits

    def _from_copy(self, res: list[Any], queries: np.ndarray, using: str, return_vector: str | None,
                   with_key: bool) -> Hits | None:
        """Hits with their vectors read from the copy; None where the copy cannot be trusted for them: a hit
        without an entry, a row that does not hold what was written for it, or vectors that do not give the
        engine's scores."""
        hits = Hits.of(res, None, using, False)
        counts = [len(r) for r in hits.ids]
        entries = [p.pop(COPY_FIELD, None) for row in hits.payloads for p in row]
        if any(e is None for e in entries):
            return self._distrust_copy("some hits have no entry in it: written without it")
        vecs = self.copy.read(np.array(entries, np.int64).reshape(-1, 2))
        if vecs is None:
            return self._distrust_copy("some rows do not hold what was written for their points: lost in a crash, "
                                       "or damaged")
        keys = vecs[using]
        scores = np.array([s for row in hits.scores for s in row], np.float32)
        if len(scores) and np.abs(np.einsum("nd,nd->n", keys, np.repeat(queries, counts, axis=0))
                                  - scores).max() > SCORE_TOLERANCE:
            return self._distrust_copy("its vectors do not give the engine's scores: replaced, or written elsewhere")
        hits.keys = keys if with_key else None
        vectors = vecs[return_vector] if return_vector else None
        hits.vectors = vectors.copy() if with_key and return_vector == using else vectors  # own arrays, as the engine's
        return hits

    def _distrust_copy(self, why: str) -> None:
        """Read hits' vectors from the engine from now on (until reopened), and say why once."""
        self.copy_doubt = why
        warnings.warn(f"memory {self.root}: its vector copy {self.copy_path} is out of step with the collection "
                      f"({why}); hits' vectors are read from the engine instead (correct, slower). `reco copy` "
                      "into a new memory gives a fresh copy", stacklevel=5)  # the caller of Memory.search

    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Record]:
        recs = self._read(self._require().retrieve, list(ids), with_payload=True, with_vector=with_vectors)
        return [_record(r) for r in recs]

    def scroll(self, limit: int, offset: Any, with_vectors: bool) -> tuple[list[Record], Any]:
        qe = self.qe
        recs, nxt = self._read(self._require().scroll, qe.ScrollRequest(offset=offset, limit=limit, with_payload=True,
                                                                         with_vector=with_vectors))
        return [_record(r) for r in recs], nxt

    def delete(self, ids: list[str]) -> None:
        self._require().update(self.qe.UpdateOperation.delete_points(list(ids)))

    def count(self, source: str | None = None) -> int:
        if self.shard is None:
            return 0
        qe = self.qe
        flt = None if source is None else qe.Filter(must=[qe.FieldCondition(key="source",
                                                                             match=qe.MatchValue(value=source))])
        return int(self._read(self.shard.count, qe.CountRequest(exact=True, filter=flt)))

    def sources(self, limit: int = 10_000) -> dict[str, int]:
        """Points per `source` payload value (at most `limit` sources), from the engine's facet counts."""
        if self.shard is None:
            return {}
        res = self._read(self.shard.facet, self.qe.FacetRequest(key="source", limit=limit, exact=True))
        return {str(h.value): int(h.count) for h in res.hits}

    def free_bytes(self) -> int:
        """Free space on the memory's disk."""
        return shutil.disk_usage(self.root).free

    def stored_bytes(self) -> int:
        """Bytes the collection takes on disk (allocated blocks: sparse files count what they hold)."""
        return sum(f.stat().st_blocks * 512 for f in self.data_path.rglob("*") if f.is_file())

    def stored_quantization(self) -> str | None:
        """The quantization the engine actually stores (read from the shard's own config file)."""
        cfg = json.loads((self.data_path / "edge_config.json").read_text())
        return "int8" if (cfg.get("quantization_config") or {}).get("scalar") else None

    def optimize(self) -> bool:
        return bool(self._require().optimize())

    def status(self) -> dict[str, Any]:
        if self.shard is None:
            return {"backend": "edge", "path": str(self.root), "points": 0}
        info = self.shard.info()
        return {"backend": "edge", "path": str(self.root), "points": info.points_count,
                "indexed_vectors": info.indexed_vectors_count, "segments": info.segments_count}

    def meta_get(self, key: str) -> Any:
        recs = self.meta.retrieve([_meta_id(key)], with_payload=True, with_vector=False)
        return json.loads(recs[0].payload["value"]) if recs else None

    def meta_set(self, key: str, value: Any) -> None:
        qe = self.qe
        point = qe.Point(_meta_id(key), {_META_VECTOR: [1.0]}, {"key": key, "value": json.dumps(value)})
        self.meta.update(qe.UpdateOperation.upsert_points([point]))
        self.meta.flush()

    def flush(self) -> None:
        """Make every acknowledged write durable: the vector copy's rows (fsync) and the engine's segments."""
        if self.copy is not None:
            self.copy.flush()
        if self.shard is not None:
            self.shard.flush()

    def close(self) -> None:
        for s in (self.shard, self.meta):
            if s is not None:
                s.flush()
                s.close()
        if self.copy is not None:
            self.copy.close()
        self.shard = self.meta = self.copy = None
        self._release_lock()

    def _release_lock(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def edge_collections(root: str | os.PathLike) -> list[str]:
    """Names of the collections stored in an embedded memory directory (data or ledger present), read from the
    directory alone: nothing is opened or created."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = set()
    for d in root.iterdir():
        if d.is_dir() and d.name.endswith("__meta") and EdgeBackend._exists(d):
            names.add(d.name[: -len("__meta")])
        elif d.is_dir() and not d.name.endswith("__vectors") and EdgeBackend._exists(d):
            names.add(d.name)
    return sorted(names)


@dataclass(frozen=True)
class UnreadableCollection:
    """A collection the engine cannot read (damaged files), as `count_edge_collection` counts it: never raised for
    a collection beside the one asked about, only said."""

    why: str  # the engine's words, shortened

    def __str__(self) -> str:
        return f"unreadable: {self.why}"


@dataclass(frozen=True)
class UncountedCollection:
    """A collection `count_edge_collection` did not count: the engine writes when it loads one (as on opening),
    and the disk has less free space than the reserve opening needs (`DISK_RESERVE`)."""

    why: str

    def __str__(self) -> str:
        return f"not counted: {self.why}"


def count_edge_collection(root: str | os.PathLike,
                          name: str) -> int | UnreadableCollection | UncountedCollection | None:
    """Points in collection `name` of an embedded memory directory (0 for a ledger without data), None when another
    process holds it, an `UnreadableCollection` when the engine cannot read it (a damaged collection is no reason
    to fail a command about another one), an `UncountedCollection` when the disk is too full to load it (loading
    writes). Takes the collection's lock while it reads, as opening it would."""
    root = Path(root)
    data = root / name
    if not EdgeBackend._exists(data):
        return 0
    free = shutil.disk_usage(root).free
    if free < DISK_RESERVE:  # the same reserve as opening: a load that fills the disk could kill the process
        return UncountedCollection(f"{free / 2**20:,.0f} MiB free on the disk, loading it needs "
                                   f"{DISK_RESERVE / 2**20:.0f} MiB")
    lock_path = root / f".{name}.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            import qdrant_edge as qe

            try:
                shard = qe.EdgeShard.load(str(data))
                try:
                    return int(shard.count(qe.CountRequest(exact=True)))
                finally:
                    shard.close()
            except BaseException as e:  # the engine's errors are plain Exceptions, its panics BaseExceptions
                if not _engine_failure(e):
                    raise
                if "WouldBlock" in str(e):
                    return None
                said = " ".join(str(e).split())
                return UnreadableCollection(said if len(said) <= 200 else said[:199] + "…")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- qdrant-client


def _is_transient(exc: BaseException) -> bool:
    """Errors worth retrying for an idempotent call: the server is briefly away or slow."""
    try:
        import grpc

        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED)
    except ImportError:  # pragma: no cover
        pass
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in (429, 502, 503, 504)
    if isinstance(exc, ResponseHandlingException):
        return True
    import httpx

    return isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError))


class ServerBackend:
    """A collection on a Qdrant server (gRPC preferred), or in qdrant-client's local mode."""

    def __init__(self, cfg: MemoryConfig, client: Any = None) -> None:
        from qdrant_client import QdrantClient, models

        self.m = models
        self.cfg = cfg
        self.name = cfg.collection
        self.meta_name = f"{cfg.collection}__meta"
        self.local = client is None and cfg.location == ":memory:"  # exact search, no payload indexes
        # qdrant-client's local mode is plain Python state, not thread-safe: serialise calls there only
        self._lock = threading.RLock() if self.local else contextlib.nullcontext()
        if client is not None:
            self.client = client
        elif cfg.location == ":memory:":
            self.client = QdrantClient(":memory:")
        else:
            self.client = QdrantClient(**cfg.client_kwargs())
        if not self._call(self.client.collection_exists, self.meta_name):
            self._call(self.client.create_collection, self.meta_name,
                       vectors_config={_META_VECTOR: models.VectorParams(size=1, distance=models.Distance.COSINE)})

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an idempotent call with bounded exponential backoff on transient errors."""
        from tenacity import (
            RetryError,
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            wait_exponential,
            wait_random,
        )

        retrying = Retrying(stop=stop_after_attempt(max(1, self.cfg.retries)),
                            wait=wait_exponential(multiplier=0.1, max=self.cfg.retry_max_wait) + wait_random(0, 0.1),
                            retry=retry_if_exception(_is_transient), reraise=False)
        try:
            with self._lock:
                return retrying(fn, *args, **kwargs)
        except RetryError as e:
            last = e.last_attempt.exception()
            raise MemoryUnavailableError(
                f"Qdrant at {self.cfg.location} did not answer after {self.cfg.retries} attempts: "
                f"{type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}"
            ) from last

    def has_collection(self) -> bool:
        return bool(self._call(self.client.collection_exists, self.name))

    def create_collection(self, dim: int, cfg: MemoryConfig) -> None:
        m = self.m
        quant = None
        if cfg.quantization == "int8":
            quant = m.ScalarQuantization(scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8,
                                                                           quantile=0.99, always_ram=True))
        elif cfg.quantization is not None:
            raise ValueError(f"quantization {cfg.quantization!r} not supported: expected None or 'int8'")
        vectors = {n: m.VectorParams(size=dim, distance=m.Distance.COSINE, on_disk=cfg.on_disk)
                   for n in VECTOR_NAMES}
        self._call(self.client.create_collection, self.name, vectors_config=vectors,
                   hnsw_config=m.HnswConfigDiff(m=cfg.hnsw_m, ef_construct=cfg.hnsw_ef_construct,
                                                full_scan_threshold=cfg.full_scan_threshold),
                   quantization_config=quant, shard_number=cfg.shard_number,
                   replication_factor=cfg.replication_factor, on_disk_payload=cfg.on_disk_payload)

    def create_payload_index(self, field: str) -> None:
        if self.local:
            return
        self._call(self.client.create_payload_index, self.name, field,
                   field_schema=self.m.PayloadSchemaType.KEYWORD)

    def upsert(self, ids: list[str], image: np.ndarray, text: np.ndarray, payloads: list[dict]) -> None:
        batch = self.m.Batch(ids=list(ids), vectors={"image": image.tolist(), "text": text.tolist()},
                             payloads=payloads)
        self._call(self.client.upsert, self.name, points=batch, wait=True)

    def search(self, queries: np.ndarray, using: str, k: int, return_vector: str | None,
               exact: bool = False, with_payload: bool = True, with_key: bool = False,
               hnsw_ef: int | None = None) -> Hits:
        m = self.m
        quant = (m.QuantizationSearchParams(ignore=exact, rescore=True, oversampling=2.0)
                 if self.cfg.quantization else None)
        params = None if self.local else m.SearchParams(hnsw_ef=max(hnsw_ef or self.cfg.hnsw_ef, k), exact=exact,
                                                         quantization=quant)
        reqs = [m.QueryRequest(query=q, using=using, limit=k, params=params, with_payload=with_payload,
                               with_vector=_vector_names(return_vector, using, with_key))
                for q in queries.tolist()]
        res = self._call(self.client.query_batch_points, self.name, requests=reqs)
        return Hits.of([r.points for r in res], return_vector, using, with_key)

    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Record]:
        recs = self._call(self.client.retrieve, self.name, ids=list(ids), with_payload=True,
                          with_vectors=with_vectors)
        return [_record(r) for r in recs]

    def scroll(self, limit: int, offset: Any, with_vectors: bool) -> tuple[list[Record], Any]:
        recs, nxt = self._call(self.client.scroll, self.name, limit=limit, offset=offset,
                               with_payload=True, with_vectors=with_vectors)
        return [_record(r) for r in recs], nxt

    def delete(self, ids: list[str]) -> None:
        self._call(self.client.delete, self.name, points_selector=self.m.PointIdsList(points=list(ids)),
                   wait=True)

    def count(self, source: str | None = None) -> int:
        if not self.has_collection():
            return 0
        m = self.m
        flt = None if source is None else m.Filter(must=[m.FieldCondition(key="source",
                                                                           match=m.MatchValue(value=source))])
        return int(self._call(self.client.count, self.name, count_filter=flt, exact=True).count)

    def sources(self, limit: int = 10_000) -> dict[str, int]:
        if not self.has_collection():
            return {}
        res = self._call(self.client.facet, self.name, key="source", limit=limit, exact=True)
        return {str(h.value): int(h.count) for h in res.hits}

    def collections(self) -> dict[str, int]:
        """Points per memory collection on this server (ledgers left out)."""
        names = [c.name for c in self._call(self.client.get_collections).collections if not c.name.endswith("__meta")]
        return {n: int(self._call(self.client.count, n, exact=True).count) for n in sorted(names)}

    def stored_quantization(self) -> str | None:
        info = self._call(self.client.get_collection, self.name)
        return "int8" if info.config.quantization_config is not None else None

    def optimize(self) -> bool:
        return False  # the server builds its indexes in the background

    def status(self) -> dict[str, Any]:
        kind = "local" if self.cfg.location == ":memory:" else "server"
        out: dict[str, Any] = {"backend": kind, "url": self.cfg.location if kind == "server" else ":memory:"}
        if self.has_collection():
            info = self._call(self.client.get_collection, self.name)
            out.update(points=info.points_count, indexed_vectors=info.indexed_vectors_count,
                       segments=info.segments_count, status=str(info.status))
        else:
            out["points"] = 0
        return out

    def meta_get(self, key: str) -> Any:
        recs = self._call(self.client.retrieve, self.meta_name, ids=[_meta_id(key)], with_payload=True)
        return json.loads(recs[0].payload["value"]) if recs else None

    def meta_set(self, key: str, value: Any) -> None:
        point = self.m.PointStruct(id=_meta_id(key), vector={_META_VECTOR: [1.0]},
                                   payload={"key": key, "value": json.dumps(value)})
        self._call(self.client.upsert, self.meta_name, points=[point], wait=True)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()


def open_backend(cfg: MemoryConfig, repair_ledger: bool = False) -> EdgeBackend | ServerBackend:
    """The one place that picks a backend from `cfg.location`."""
    if cfg.kind == "edge":
        return EdgeBackend(cfg.location, cfg, repair_ledger)
    return ServerBackend(cfg)
