"""Settings for the memory, read once from arguments and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

DEFAULT_LOCATION = "./reco-data"
DEFAULT_COLLECTION = "reco_memory"


def default_location() -> str:
    """`RECO_MEMORY` if set, else `./reco-data` (an embedded Qdrant Edge directory)."""
    return os.environ.get("RECO_MEMORY") or DEFAULT_LOCATION


@dataclass(frozen=True)
class MemoryConfig:
    """Where the memory lives and how its Qdrant collection is built and queried."""

    location: str = field(default_factory=default_location)  # directory | ":memory:" | http(s)://host[:port]
    collection: str = DEFAULT_COLLECTION  # one collection (or Edge shard) per memory
    # server connection
    api_key: str | None = field(default=None, repr=False)  # never printed; RECO_API_KEY / QDRANT_API_KEY
    prefer_grpc: bool = True  # gRPC on grpc_port; REST on the URL's port as fallback
    grpc_port: int = 6334
    timeout: float = 60.0  # seconds per request; qdrant-client's gRPC default (5 s) is too short for bulk
    retries: int = 5  # attempts for idempotent calls on transient server errors
    retry_max_wait: float = 8.0  # cap of the exponential backoff, seconds
    # collection layout, applied by migrations
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    full_scan_threshold: int = 10_000  # KB of vectors below which a segment is searched exactly
    quantization: str | None = None  # None | "int8" (scalar quantization, searched with rescoring)
    on_disk: bool = False  # keep original vectors on disk (mmap) instead of RAM
    shard_number: int = 1  # server only: shards of the collection
    replication_factor: int = 1  # server only: copies of each shard
    # search
    hnsw_ef: int = 128  # beam width at search time; higher = better recall, slower
    upsert_batch: int = 512  # points per upsert request

    def with_env(self) -> MemoryConfig:
        """Fill secrets from the environment when not given explicitly."""
        key = self.api_key or os.environ.get("RECO_API_KEY") or os.environ.get("QDRANT_API_KEY")
        return replace(self, api_key=key or None)

    @property
    def kind(self) -> str:
        """'server' for URLs, 'local' for qdrant-client's in-process ':memory:', else 'edge'."""
        if self.location.startswith(("http://", "https://")):
            return "server"
        if self.location == ":memory:":
            return "local"
        return "edge"
