"""The two ways we talk to Qdrant, behind one protocol (`Backend`, in `base.py`).

`EdgeBackend` (`edge.py`) runs Qdrant's engine in-process (Qdrant Edge), persistent in a directory: the embedded
default. `ServerBackend` (`server.py`) talks to a Qdrant server over gRPC with qdrant-client; over
`QdrantClient(":memory:")` it is also the in-process stand-in for the server in tests. Both store one point per
image-text pair with two named vectors, `image` and `text`.
"""

from __future__ import annotations

from .._deprecated import renamed
from ..config import MemoryConfig
from .base import (
    DISK_RESERVE,
    VECTOR_NAMES,
    Backend,
    Hits,
    MemoryDamagedError,
    MemoryFullError,
    MemoryInUseError,
    MemoryUnavailableError,
    RecoMemoryError,
    Record,
)
from .edge import (
    EdgeBackend,
    UncountedCollection,
    UnreadableCollection,
    count_edge_collection,
    edge_collections,
    tree_bytes,
)
from .server import ServerBackend

__all__ = ["DISK_RESERVE", "VECTOR_NAMES", "Backend", "Hits", "Record", "EdgeBackend", "ServerBackend",
           "RecoMemoryError", "MemoryInUseError", "MemoryUnavailableError", "MemoryFullError", "MemoryDamagedError",
           "UnreadableCollection", "UncountedCollection", "count_edge_collection", "edge_collections", "tree_bytes",
           "open_backend"]


def open_backend(cfg: MemoryConfig, repair_ledger: bool = False) -> Backend:
    """The one place that picks a backend from `cfg.location`."""
    if cfg.kind == "edge":
        return EdgeBackend(cfg.location, cfg, repair_ledger)
    return ServerBackend(cfg)

__getattr__ = renamed("reco_qdrant.backends", {"MemoryError_": ("RecoMemoryError", RecoMemoryError)})
