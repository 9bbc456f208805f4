"""The ledger's write versions and acknowledged point counts, and the damage they reveal on opening.

Every write bumps a version (keys caches of search results). Where one process holds the storage at a time
(`Backend.exclusive`: embedded), the same record says which point counts the engine may hold, and opening checks
the engine against it and reads a sample of points whole: cheap checks that find lost segments, a bad restore or a
garbled vector file before a search returns wrong neighbours. `reco doctor` reads everything.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends import VECTOR_NAMES, MemoryDamagedError

# {"n": writes so far, "token": random}: keys caches of search results; where the storage is exclusive also
# "points": [low, high], the point counts the engine may hold (the range the last write may leave if interrupted;
# one count once acknowledged)
WRITE_VERSION_KEY = "write_version"
OPEN_SAMPLE = 256  # points whose vectors are checked on opening (the lowest ids: spread over the storage)


class Ledger:
    """`Memory`'s write versions and count checks (a mixin: it uses `backend`, `cfg` and `_write_lock`)."""

    backend: Any
    cfg: Any
    _write_lock: Any
    _wrote: bool
    count_check: str
    adopted_count: tuple[str, int] | None
    dim: int | None

    @property
    def write_version(self) -> str:
        """Changes with every upsert and delete (from any process): keys caches of search results."""
        v = self.backend.meta_get(WRITE_VERSION_KEY) or {"n": 0, "token": ""}
        return f"{v['n']}-{v['token']}"

    def _bump_write_version(self, low: int = 0, high: int = 0) -> None:
        # Bumped *before* the write: a crash in between costs a cache miss, never a stale hit. The random
        # token keeps two writers that both read n from colliding on n + 1. Where the storage is exclusive the same
        # record (one ledger write per data write) says how many points the write may leave: the count plus low..high.
        with self._write_lock:
            v = self.backend.meta_get(WRITE_VERSION_KEY) or {"n": 0}
            rec = {"n": int(v["n"]) + 1, "token": uuid.uuid4().hex[:12]}
            if self.backend.exclusive:
                n = self.backend.count()
                rec["points"] = [max(0, n + low), n + high]
                self._wrote = True
            self.backend.meta_set(WRITE_VERSION_KEY, rec)

    def _ack_points(self, n: int | None = None) -> None:
        """The ledger acknowledges the engine's count `n` (default: now) as the one count it may hold (exclusive
        storage only)."""
        with self._write_lock:
            v = self.backend.meta_get(WRITE_VERSION_KEY) or {"n": 0, "token": ""}
            n = self.backend.count() if n is None else n
            self.backend.meta_set(WRITE_VERSION_KEY, {**v, "points": [n, n]})
            self._wrote = False

    # ------------------------------------------------------------------ damage found on opening
    def _check_points(self, accept_count: bool = False, check_sample: bool = True) -> None:
        """On opening (exclusive storage): the engine holds the count of points the ledger acknowledged (or one a
        write in progress may have left), and a fixed sample of points has whole vectors equal to their copy. Cheap: one
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
        """[low, high], the point counts the ledger acknowledged (one count when equal); None if unrecorded."""
        rec = (self.backend.meta_get(WRITE_VERSION_KEY) or {}).get("points")
        return None if rec is None else [int(rec[0]), int(rec[1])]

    def _check_collection_gone(self, accept_count: bool = False) -> None:
        """On opening (exclusive storage) a memory without its collection: fine when the ledger acknowledged no point
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
            f"memory {root}: the engine holds 0 points (its collection directory {Path(root) / self.cfg.collection} "
            f"is missing), but the ledger acknowledged {said} (deleted by hand, or an incomplete copy or restore?); "
            f"restore the directory from a backup (`reco restore BACKUP --memory DIR`), or, to start again from an "
            f"empty collection deliberately, adopt the empty engine with `reco doctor --memory {root} --accept-count` "
            "(`Memory.open(..., accept_count=True)`)")
        err.counts = (0, said)  # type: ignore[attr-defined]
        raise err

    def accept_count(self) -> tuple[str, int]:
        """Make the ledger acknowledge the engine's point count (exclusive storage; after a deliberate change made
        outside reco-qdrant, once `reco doctor` found every point whole). Returns (what the ledger acknowledged before,
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
        dim = self.dim
        for r in recs:
            for m in VECTOR_NAMES:
                v = r.vectors.get(m)
                if v is None or (dim is not None and len(v) != dim):
                    return f"point {r.id} has no whole {m} vector ({0 if v is None else len(v)} values)"
                x = np.asarray(v, np.float32)
                norm = float(np.linalg.norm(x)) if np.isfinite(x).all() else float("nan")
                if not abs(norm - 1.0) <= 1e-3:
                    return f"point {r.id}'s {m} vector has norm {norm:.4g}, expected 1 (its vector file is damaged)"
        self.backend.check_vector_copy(recs)  # a cache of the engine's vectors: distrusted if it differs
        return None


def _said_count(rec: Sequence[int]) -> str:
    """[low, high] acknowledged point counts, said: "1,200" or "between 100 and 200"."""
    return f"{int(rec[0]):,}" if rec[0] == rec[1] else f"between {int(rec[0]):,} and {int(rec[1]):,}"
