"""A Qdrant server over gRPC with qdrant-client, or qdrant-client's local mode (the server's stand-in in tests)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import MemoryConfig
from .base import (
    _META_VECTOR,
    VECTOR_NAMES,
    Hits,
    MemoryUnavailableError,
    Record,
    T,
    _meta_id,
    _record,
    _vector_names,
    check_quantization,
    search_params,
)


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

    exclusive = False  # other processes may write at the same time
    indexes_itself = True  # the server's optimizer builds indexes in the background

    def __init__(self, cfg: MemoryConfig, client: Any = None) -> None:
        from qdrant_client import QdrantClient, models
        from qdrant_client.qdrant_remote import QdrantRemote

        self.m = models
        self.cfg = cfg
        self.name = cfg.collection
        self.meta_name = f"{cfg.collection}__meta"
        self.local = client is None and cfg.location == ":memory:"  # exact search, no payload indexes
        if client is not None:
            self.client = client
        elif cfg.location == ":memory:":
            self.client = QdrantClient(":memory:")
        else:
            self.client = QdrantClient(**cfg.client_kwargs())
        # Anything but a client of a real server (local mode, given or made here; a wrapper) is plain Python state,
        # not thread-safe: calls to it are serialised, and upserts go one at a time (threads would only contend:
        # local mode, 50k pairs, 6,603 pairs/s one at a time, 5,120 with 4). A server applies concurrent upserts in
        # parallel while gRPC waits without the GIL.
        remote = isinstance(getattr(self.client, "_client", None), QdrantRemote)
        self._lock = contextlib.nullcontext() if remote else threading.RLock()
        self.upload_workers = max(1, cfg.upload_workers) if remote else 1
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
        quant, kind = None, check_quantization(cfg)
        if kind == "int8":
            quant = m.ScalarQuantization(scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8, quantile=0.99,
                                                                           always_ram=True))
        elif kind == "binary":
            quant = m.BinaryQuantization(binary=m.BinaryQuantizationConfig(
                always_ram=True, encoding=m.BinaryQuantizationEncoding.TWO_BITS,
                query_encoding=m.BinaryQuantizationQueryEncoding.SCALAR8BITS))
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
               exact: bool = False, with_payload: bool = True, with_searched: bool = False,
               hnsw_ef: int | None = None) -> Hits:
        m = self.m
        params = None if self.local else search_params(m, self.cfg, k, exact, hnsw_ef)
        reqs = [m.QueryRequest(query=q, using=using, limit=k, params=params, with_payload=with_payload,
                               with_vector=_vector_names(return_vector, using, with_searched))
                for q in queries.tolist()]
        res = self._call(self.client.query_batch_points, self.name, requests=reqs)
        return Hits.of([r.points for r in res], return_vector, using, with_searched)

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

    def collections(self) -> dict[str, Any]:
        """Points per other memory collection on this server (ledgers left out)."""
        names = [c.name for c in self._call(self.client.get_collections).collections
                 if not c.name.endswith("__meta") and c.name != self.name]
        return {n: int(self._call(self.client.count, n, exact=True).count) for n in sorted(names)}

    def stored_quantization(self) -> str | None:
        q = self._call(self.client.get_collection, self.name).config.quantization_config
        return None if q is None else "binary" if getattr(q, "binary", None) is not None else "int8"

    def optimize(self) -> bool:
        return False  # the server builds its indexes in the background

    def index_backlog(self) -> tuple[int, int]:
        return self.count(), 0  # nothing for us to build

    def free_bytes(self) -> None:
        return None  # the server's disk is not ours to see

    def stored_bytes(self) -> None:
        return None

    def storage_paths(self) -> None:
        return None  # the server's files are not ours to copy: it takes snapshots

    def snapshot(self) -> dict[str, str]:
        if self.cfg.location == ":memory:":
            raise ValueError("memory :memory: lives in this process only, and qdrant-client's local mode has no "
                             "snapshots: copy it into a directory or a server with `reco copy` / `copy_memory`")
        names = {}
        for c in (self.name, self.meta_name):
            if not self._call(self.client.collection_exists, c):
                raise FileNotFoundError(f"memory {self.cfg.location.rstrip('/')} has no collection {c!r}: nothing "
                                        "to snapshot")
            names[c] = self.client.create_snapshot(c, wait=True).name  # not retried: a retry takes a second one
        return names

    def check_vector_copy(self, records: list[Record]) -> None:
        pass  # a server memory keeps no vector copy

    def stale_copy_rows(self, records: list[Record]) -> None:
        return None

    def vector_copy_rows(self) -> None:
        return None

    def copy_rows(self, records: list[Record]) -> None:
        return None

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

