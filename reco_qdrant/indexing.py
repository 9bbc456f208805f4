"""When an embedded memory builds its HNSW index: due, postponed while the disk has no room, and refused early.

Qdrant Edge builds an index only when asked, in the caller's thread. A memory filled from Python is indexed before
its searches get slow (as a server's optimizer would do by itself), with builds geometrically spaced so that a
stream of writes between searches costs O(log n) builds; a build that does not fit on the disk is postponed, never
a reason to refuse a read (what is not indexed is searched exactly: correct, slower).
"""

from __future__ import annotations

import errno
import warnings
from typing import Any

from .backends import DISK_RESERVE, VECTOR_NAMES, MemoryFullError, RecoMemoryError
from .progress import status_line

EXACT_SEARCH_BELOW = 20_000  # points; below this Edge searches exactly and needs no HNSW build


def index_due(points: int, unindexed: int, threshold: int = EXACT_SEARCH_BELOW) -> bool:
    """Whether an index build is due: more than `threshold` points, and more than `threshold` vectors
    unindexed that are also more than a fifth of the indexed ones (see `Memory.ensure_indexed`)."""
    indexed = points * len(VECTOR_NAMES) - unindexed
    return points > threshold and unindexed > max(threshold, indexed // 5)


class IndexPostponedWarning(UserWarning):
    """An index build that was due when reading did not fit on the disk: postponed, searches stay exact."""


class Indexing:
    """`Memory`'s index builds and disk-space checks (a mixin: it uses `backend`, `cfg` and `_write_lock`)."""

    backend: Any
    cfg: Any
    _write_lock: Any
    _unchecked_writes: int
    _postponed_warned: bool
    _postponed: tuple[int, int, float] | None

    def optimize(self) -> bool:
        """Build indexes now (Edge: HNSW over unindexed segments; a server does this by itself).

        Raises `MemoryFullError` (before building anything) when the rebuilt segments would not fit on the disk."""
        with self._write_lock:
            self._check_index_room()
            return self.backend.optimize()

    def _check_index_room(self) -> None:
        stored = self.backend.stored_bytes() if self.backend.has_collection() else None
        if stored is not None:
            self._check_space(stored, "building the index")  # rebuilt beside the old

    def _index_if_room(self) -> bool:
        """The index build a read finds due (on opening, before a search): one that fails (no room on the disk by
        our estimate, or the engine's own error, e.g. a disk that filled meanwhile) is postponed with one warning,
        and reads go on (segments not indexed are searched exactly: correct, slower). Reads are never refused
        because an index could not be built; searches retry it once the disk has room (see `_index_retry_due`)."""
        try:
            return self.ensure_indexed()
        except (MemoryFullError, OSError, RuntimeError) as e:
            if isinstance(e, RecoMemoryError) and not isinstance(e, MemoryFullError):
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
            if free is None:
                raise LookupError
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
            free = self.backend.free_bytes()
            return free is None or free >= need
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
        """Refuse (before writing anything) what would leave the memory's disk nearly full (where we can see it)."""
        free = self.backend.free_bytes()
        if free is None:
            return
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
        return self.backend.index_backlog()
