"""Numbered schema migrations of a memory; the ledger of applied ones lives in Qdrant itself.

Each `NNNN_name.py` here defines `upgrade(ctx: MigrationContext) -> None`. Migrations are applied in
order, each once; `reco migrate` (or `Memory.migrate`) applies the pending ones.
"""

from __future__ import annotations

import importlib
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..config import MemoryConfig

LEDGER_KEY = "migrations"
# MemoryConfig fields fixed when the collection is created, recorded with the memory (0001, 0003)
LAYOUT_FIELDS = ("quantization", "on_disk", "on_disk_payload", "hnsw_m", "hnsw_ef_construct", "full_scan_threshold",
                 "shard_number", "replication_factor", "vector_copy")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.py$")


@dataclass
class MigrationContext:
    backend: Any  # a reco_qdrant.backends.Backend
    cfg: MemoryConfig
    dim: int | None  # embedding dimension, known once an encoder or data is recorded


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    module: ModuleType


def discover() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found = []
    for f in sorted(Path(__file__).parent.iterdir()):
        m = _NAME.match(f.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), importlib.import_module(f"{__name__}.{f.stem}")))
    return found


def applied(backend: Any) -> list[dict]:
    return list(backend.meta_get(LEDGER_KEY) or [])


def pending(backend: Any) -> list[Migration]:
    """Migrations not yet applied; all of them when the collection itself is gone (deleted by hand)."""
    done = {e["version"] for e in applied(backend)} if backend.has_collection() else set()
    return [m for m in discover() if m.version not in done]


def apply_pending(backend: Any, cfg: MemoryConfig, dim: int | None) -> list[str]:
    """Apply pending migrations in order; record each in the ledger right after it succeeds."""
    ledger = applied(backend)
    if ledger and not backend.has_collection():
        acked = (backend.meta_get("write_version") or {}).get("points")  # memory.WRITE_VERSION_KEY (Edge)
        if acked is not None and int(acked[0]) > 0:  # points acknowledged: re-creating it empty would hide the loss
            from ..backends import MemoryDamagedError

            raise MemoryDamagedError(
                f"memory {cfg.location}: collection {cfg.collection!r} is gone (the engine holds 0 points), but its "
                f"ledger acknowledged {int(acked[0]):,}; not re-created empty: restore the memory from a backup, or "
                f"adopt the empty engine deliberately with `reco doctor --memory {cfg.location} --accept-count`")
        warnings.warn(f"memory {cfg.location}: collection {cfg.collection!r} is gone but its ledger survived "
                      "(deleted by hand?): re-creating it empty and applying every migration again", stacklevel=2)
        ledger = []
    names = []
    for mig in pending(backend):
        mig.module.upgrade(MigrationContext(backend, cfg, dim))
        ledger.append({"version": mig.version, "name": mig.name, "applied_at": time.time()})
        backend.meta_set(LEDGER_KEY, ledger)
        names.append(f"{mig.version:04d}_{mig.name}")
    return names
