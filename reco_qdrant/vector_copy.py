"""A float32 copy of an embedded memory's vectors beside its Qdrant Edge collection.

Why: a search that returns its hits' vectors pays the binding to hand every hit's vector over as
Python floats (0.3 ms of a 0.6 ms query at 200k points, 512-d, k=10). With this copy the engine
returns each hit's row number (payload field `_row`) and the vectors are gathered here with numpy.

How it stays correct: the copy is append-only. A write appends the pairs' vectors first and then
upserts the points with their row numbers, so a point only ever names a row that was written for it;
re-upserting a point appends new rows (the old ones become garbage, reclaimed by `reco copy`). Every
gather is also checked against the engine: the searched modality's vectors are read from the copy and
their dot products with the queries must equal the engine's scores, so a copy that lost its tail in a
crash, or was replaced by hand, is noticed and the engine's own vectors are used instead.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

ROW_FIELD = "_row"  # payload field: the point's row in the copy
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

    def append(self, vectors: dict[str, np.ndarray]) -> np.ndarray:
        """Write N rows ({name: [N, dim] float32}) after the last one; returns their row numbers [N]."""
        n = len(next(iter(vectors.values())))
        start = self.rows
        for name, f in self._files.items():
            x = np.ascontiguousarray(vectors[name], np.float32)
            if x.shape != (n, self.dim):
                raise ValueError(f"vector copy: {name} rows have shape {x.shape}, expected {(n, self.dim)}")
            fd = os.open(f, os.O_WRONLY)
            try:
                os.pwrite(fd, x.tobytes(), start * 4 * self.dim)
            finally:
                os.close(fd)
        self.rows = start + n
        return np.arange(start, start + n, dtype=np.int64)

    def gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Vectors [..., dim] float32 of `rows` [...] (each < `self.rows`)."""
        m = self._maps.get(name)
        if m is None or len(m) < self.rows:
            m = self._maps[name] = np.memmap(self._files[name], np.float32, "r", shape=(self.rows, self.dim))
            m._mmap.madvise(mmap.MADV_RANDOM)  # hits are scattered: no read-ahead of rows nobody asked for
        return np.asarray(m[rows], np.float32)

    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self._files.values())

    def close(self) -> None:
        self._maps.clear()
