"""A float32 copy of an embedded memory's vectors beside its Qdrant Edge collection.

Why: a search that returns its hits' vectors pays the binding to hand every hit's vector over as
Python floats, about half of such a query's time (benchmarks/README.md). With this copy the engine
returns each hit's entry (payload field `_copy`: its row and a CRC-32 of what was written there) and
the vectors are gathered here with numpy.

How it stays correct: the copy is append-only. A write appends the pairs' vectors first and then
upserts the points with their entries, so a point only ever names a row that was written for it;
re-upserting a point appends new rows (the old ones become garbage, reclaimed by `reco copy`). Every
gather is checked twice: each row's checksum against the point's entry (a row lost in a crash, reused
after it, or damaged on disk), and, for a search's hits, the searched modality's vectors against the engine's
scores (a copy replaced by another memory's). Where either fails, the engine's own vectors are used.
Training's gathers by id (`vector_columns.py`) check every row's checksum once, when its row is looked up.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

try:  # the same CRC-32, 4-5x faster (ISA-L); a search checks every hit's row
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives identical checksums
    from zlib import crc32

COPY_FIELD = "_copy"  # payload field: [row, CRC-32 of the row's vectors] of the point in the copy
SCORE_TOLERANCE = 1e-3  # |engine score - query . copied vector| allowed (rescoring is float32 on both sides)


class VectorCopy:
    """Files `<dir>/{image,text}.f32`: raw float32 rows [rows, dim], written at the end, read memory-mapped."""

    def __init__(self, path: str | os.PathLike, dim: int, names: tuple[str, ...]) -> None:
        self.path, self.dim, self.names = Path(path), dim, names
        self._files = {n: self.path / f"{n}.f32" for n in names}
        self._maps: dict[str, np.ndarray] = {}
        # a crash mid-write leaves a partial row (or a shorter file): the next write starts over it
        self.rows = min(f.stat().st_size for f in self._files.values()) // (4 * dim)

    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, names: tuple[str, ...]) -> VectorCopy:
        """An empty copy (replacing any left from an earlier collection at `path`)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        for n in names:
            (p / f"{n}.f32").write_bytes(b"")
        return cls(p, dim, names)

    @classmethod
    def open(cls, path: str | os.PathLike, dim: int, names: tuple[str, ...]) -> VectorCopy | None:
        """The copy at `path`, or None when there is none (memories created without one)."""
        p = Path(path)
        if not all((p / f"{n}.f32").is_file() for n in names):
            return None
        return cls(p, dim, names)

    def append(self, vectors: dict[str, np.ndarray]) -> list[list[int]]:
        """Write N rows ({name: [N, dim] float32}) after the last one; returns each row's entry [row, crc]."""
        n = len(next(iter(vectors.values())))
        start = self.rows
        cols = [np.ascontiguousarray(vectors[name], np.float32) for name in self.names]
        for name, x in zip(self.names, cols):
            if x.shape != (n, self.dim):
                raise ValueError(f"vector copy: {name} rows have shape {x.shape}, expected {(n, self.dim)}")
            fd = os.open(self._files[name], os.O_WRONLY)
            try:
                os.pwrite(fd, x.tobytes(), start * 4 * self.dim)
            finally:
                os.close(fd)
        self.rows = start + n
        return [[start + i, c] for i, c in enumerate(_crcs(cols))]

    def read(self, entries: np.ndarray) -> dict[str, np.ndarray] | None:
        """Vectors {name: [N, dim] float32} at the rows of `entries` [N, 2] (row, crc); None when any row is
        past the end, or does not hold what was written for its entry."""
        rows = entries[:, 0]
        if not len(rows):
            return {name: np.zeros((0, self.dim), np.float32) for name in self.names}
        if rows.min() < 0 or rows.max() >= self.rows:
            return None
        out = {name: self.gather(name, rows) for name in self.names}
        if (np.array(_crcs([out[n] for n in self.names]), np.int64) != entries[:, 1]).any():
            return None
        return out

    def gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Vectors [..., dim] float32 of `rows` [...] (each < `self.rows`), unchecked."""
        m = self._maps.get(name)
        if m is None or len(m) < self.rows:
            m = self._maps[name] = np.memmap(self._files[name], np.float32, "r", shape=(self.rows, self.dim))
            raw = getattr(m, "_mmap", None)  # hits are scattered: no read-ahead of rows nobody asked for
            if raw is not None and hasattr(mmap, "MADV_RANDOM"):
                raw.madvise(mmap.MADV_RANDOM)
        return np.asarray(m[rows], np.float32)

    def flush(self) -> None:
        """Make the rows written so far durable (fsync each file)."""
        for f in self._files.values():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        self._maps.clear()


def _crcs(cols: list[np.ndarray]) -> list[int]:
    """CRC-32 of each row's vectors, names in order (cols: [N, dim] float32 each)."""
    if not cols:
        return []
    if any(c.ndim != 2 or c.shape != cols[0].shape for c in cols):
        raise ValueError(f"vector columns of shapes {[c.shape for c in cols]}: expected one [N, dim] shape")
    views = [memoryview(np.ascontiguousarray(c, np.float32).reshape(-1).view(np.uint8)) for c in cols]
    width = 4 * cols[0].shape[1]
    out = []
    for s in range(0, len(views[0]) if width else 0, width):  # slices of a memoryview: no copies
        c = 0
        for v in views:
            c = crc32(v[s:s + width], c)
        out.append(c)
    return out
