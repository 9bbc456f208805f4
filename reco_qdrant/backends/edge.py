"""Qdrant Edge: the engine run in-process, persistent in a directory (the embedded default)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MemoryConfig
from ..vector_copy import COPY_FIELD, SCORE_TOLERANCE, VectorCopy
from .base import (
    _META_VECTOR,
    _RECOVER,
    DISK_RESERVE,
    VECTOR_NAMES,
    Hits,
    MemoryDamagedError,
    MemoryFullError,
    MemoryInUseError,
    RecoMemoryError,
    Record,
    T,
    _engine_failure,
    _meta_id,
    _record,
    _vector_names,
    check_quantization,
    search_params,
)


class EdgeBackend:
    """Qdrant Edge shards in a directory: `<dir>/<collection>/` (data), `<dir>/<collection>__meta/` (ledger),
    and `<dir>/<collection>__vectors/` (a float32 copy of the vectors for fast hits; see `vector_copy.py`)."""

    exclusive = True  # the directory's lock: one process at a time
    indexes_itself = False  # the engine builds an index only when asked (`optimize`), in the caller's thread
    upload_workers = 1  # the engine writes in the caller's thread holding the GIL: threads would only queue

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
            if free < DISK_RESERVE:  # opening maps and fills write-ahead-log segments
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
            raise RecoMemoryError(f"{self.root} holds no memory collection yet: ingest data or run `reco migrate`")
        return self.shard

    def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A read from the engine; its failures on our well-formed requests mean files it cannot read."""
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if not _engine_failure(e) or isinstance(e, RecoMemoryError):
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
        quant, kind = None, check_quantization(cfg)
        if kind == "int8":
            quant = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
        elif kind == "binary":
            quant = qe.BinaryQuantizationConfig(always_ram=True, encoding=qe.BinaryQuantizationEncoding.TwoBits,
                                                query_encoding=qe.BinaryQuantizationQueryEncoding.Scalar8Bits)
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
               exact: bool = False, with_payload: bool = True, with_searched: bool = False,
               hnsw_ef: int | None = None) -> Hits:
        qe = self.qe
        params = search_params(qe, self.cfg, k, exact, hnsw_ef)
        with_vector = _vector_names(return_vector, using, with_searched)

        def query(with_vector: list[str] | bool, with_payload: bool | list[str]) -> list[Any]:
            reqs = [qe.QueryRequest(limit=k, query=qe.Query.Nearest(q, using=using), with_vector=with_vector,
                                    with_payload=with_payload, params=params) for q in queries.tolist()]
            return self._read(self._require().query_batch, qe.QueryBatchRequest(reqs))

        if with_vector and self.copy is not None and self.copy_doubt is None:
            hits = self._from_copy(query(False, True if with_payload else [COPY_FIELD]), queries, using,
                                   return_vector, with_searched)
            if hits is not None:  # (payloads asked only for the entry are {} once it is taken out)
                return hits
        hits = Hits.of(query(with_vector, with_payload), return_vector, using, with_searched)
        for p in (p for row in hits.payloads for p in row):
            p.pop(COPY_FIELD, None)
        return hits

    def _from_copy(self, res: list[Any], queries: np.ndarray, using: str, return_vector: str | None,
                   with_searched: bool) -> Hits | None:
        """Hits with their vectors read from the copy; None where the copy cannot be trusted for them: a hit
        without an entry, a row that does not hold what was written for it, or vectors that do not give the
        engine's scores."""
        hits = Hits.of(res, None, using, False)
        counts = [len(r) for r in hits.ids]
        entries = [p.pop(COPY_FIELD, None) for row in hits.payloads for p in row]
        vecs = self._read_checked(entries, "hits", stacklevel=7)  # past Memory.search's comprehension frame too
        if vecs is None:
            return None
        searched = vecs[using]
        scores = np.array([s for row in hits.scores for s in row], np.float32)
        if len(scores) and np.abs(np.einsum("nd,nd->n", searched, np.repeat(queries, counts, axis=0))
                                  - scores).max() > SCORE_TOLERANCE:
            return self._distrust_copy("its vectors do not give the engine's scores: replaced, or written elsewhere",
                                       stacklevel=6)
        hits.searched = searched if with_searched else None
        vectors = vecs[return_vector] if return_vector else None
        same = with_searched and return_vector == using
        hits.vectors = vectors.copy() if same else vectors  # own arrays, as the engine's are
        return hits

    def _read_checked(self, entries: list[list[int] | None], what: str,
                      stacklevel: int) -> dict[str, np.ndarray] | None:
        """The copy's vectors {name: [N, d]} at these entries ([row, crc] each; None for a point written without
        one), every row checked against its checksum; None, and the copy no longer trusted, where some entry is
        missing or some row fails (`what`: the points' name in the warning; `stacklevel`: see `_distrust_copy`)."""
        if any(e is None for e in entries):
            return self._distrust_copy(f"some {what} have no entry in it: written without it", stacklevel)
        vecs = self.copy.read(np.array(entries, np.int64).reshape(-1, 2))
        if vecs is None:
            return self._distrust_copy("some rows do not hold what was written for their points: lost in a crash, "
                                       "damaged, or from another memory", stacklevel)
        return vecs

    def _distrust_copy(self, why: str, stacklevel: int) -> None:
        """Read hits' vectors from the engine from now on (until reopened), and say why once; `stacklevel` points
        the warning at the user's line (the caller of `Memory.search` or `Memory.vector_columns`), counted from
        here."""
        self.copy_doubt = why
        warnings.warn(f"memory {self.root}: its vector copy {self.copy_path} is out of step with the collection "
                      f"({why}); hits' vectors are read from the engine instead (correct, slower). `reco copy` "
                      "into a new memory gives a fresh copy", stacklevel=stacklevel)

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

    def collections(self) -> dict[str, Any]:
        """Points per other collection in this directory, counted as `count_edge_collection` does."""
        own = self.cfg.collection
        return {n: count_edge_collection(self.root, n) for n in edge_collections(self.root) if n != own}

    def free_bytes(self) -> int:
        """Free space on the memory's disk."""
        return shutil.disk_usage(self.root).free

    def stored_bytes(self) -> int:
        """Bytes the collection takes on disk (allocated blocks: sparse files count what they hold)."""
        return tree_bytes([self.data_path])

    def storage_paths(self) -> list[Path]:
        """The collection, its ledger and its vector copy: those that exist."""
        parts = (self.data_path, self.root / f"{self.cfg.collection}__meta", self.copy_path)
        return [p for p in parts if p.exists()]

    def snapshot(self) -> dict[str, str]:
        raise ValueError(f"memory {self.root} is embedded: `Memory.backup(DEST)` copies it")

    def check_vector_copy(self, records: list[Record]) -> None:
        entries = [r.copy_entry for r in records]
        if self.copy is None or self.copy_doubt is not None or not records or any(e is None for e in entries):
            return
        diff = self._copy_diff(records)
        if diff is None or not (diff <= 1e-5).all():
            self._distrust_copy("found on opening: sampled points' rows do not hold their vectors: lost in a crash, "
                                "damaged, or from another memory", stacklevel=5)

    def stale_copy_rows(self, records: list[Record]) -> list[str] | None:
        if self.copy is None:
            return None

        def wrong(batch: list[Record]) -> np.ndarray | None:  # [N] bool, or None when some row fails its checksum
            diff = self._copy_diff(batch)
            return None if diff is None else (diff > 1e-6).any(0)

        have = [r for r in records if r.copy_entry is not None]
        bad = wrong(have)  # one read for the batch; record by record only when that read fails
        if bad is None:
            bad = np.array([w is None or bool(w[0]) for w in map(wrong, ([r] for r in have))], bool)
        return [r.id for r in records if r.copy_entry is None] + [r.id for r, b in zip(have, bad) if b]

    def _copy_diff(self, records: list[Record]) -> np.ndarray | None:
        """[modalities, N]: how far each record's row in the vector copy lies from its vectors (largest absolute
        difference), in one read; None when some row fails its checksum."""
        got = self.copy.read(np.array([r.copy_entry for r in records], np.int64).reshape(-1, 2))
        if got is None:
            return None
        return np.stack([np.abs(got[m] - np.array([r.vectors[m] for r in records], np.float32)).max(1)
                         for m in VECTOR_NAMES])

    def vector_copy_rows(self) -> int | None:
        return None if self.copy is None else self.copy.rows

    def copy_rows(self, records: list[Record]) -> tuple[VectorCopy, np.ndarray] | None:
        if self.copy is None or self.copy_doubt is not None:
            return None
        entries = [r.copy_entry for r in records]
        if self._read_checked(entries, "points", stacklevel=7) is None:
            return None
        return self.copy, np.array(entries, np.int64).reshape(-1, 2)[:, 0]

    def stored_quantization(self) -> str | None:
        """The quantization the engine actually stores (read from the shard's own config file)."""
        cfg = json.loads((self.data_path / "edge_config.json").read_text()).get("quantization_config") or {}
        return "int8" if cfg.get("scalar") else "binary" if cfg.get("binary") else None

    def optimize(self) -> bool:
        return bool(self._require().optimize())

    def index_backlog(self) -> tuple[int, int]:
        st = self.status()
        return st["points"], st["points"] * len(VECTOR_NAMES) - st.get("indexed_vectors", 0)

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


def tree_bytes(paths: list[Path]) -> int:
    """Bytes these directories take on disk: allocated blocks (the engine's preallocated files are sparse, and a
    sparse copy keeps them so); files that vanish meanwhile count nothing."""
    total = 0
    for top in paths:
        for f in top.rglob("*"):
            try:
                total += f.stat().st_blocks * 512 if f.is_file() else 4096
            except FileNotFoundError:
                pass
    return total
