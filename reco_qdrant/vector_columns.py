"""The memory's vectors as memory-mapped float16 columns, gathered with numpy (for many searches that need the
hits' vectors, such as a training cache of N queries x k hits)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .backends import VECTOR_NAMES, RecoMemoryError
from .progress import progress_bar


class VectorColumns:
    """The memory's vectors as columns: `vectors[modality]` [M, d] float16 (memory-mapped) and the point id
    of each row, `ids` [M]."""

    def __init__(self, ids: np.ndarray, vectors: dict[str, np.ndarray]) -> None:
        self.ids, self.vectors = ids, vectors
        self._row = {pid: i for i, pid in enumerate(ids.tolist())}
        self._row[""] = -1  # no hit

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each point id (any shape); -1 for "" (no hit). Unknown ids are an error (a stale column)."""
        get = self._row.get
        flat = [get(i, -2) for i in np.asarray(ids).ravel().tolist()]
        rows = np.array(flat, np.int64).reshape(np.shape(ids))
        if (rows == -2).any():
            raise RecoMemoryError(f"point {np.asarray(ids).ravel()[int(np.argmax(rows.ravel() == -2))]} is not in the "
                               "memory's vector columns: they are stale")
        return rows

    def gather(self, ids: np.ndarray, modality: str) -> np.ndarray:
        """Vectors [..., d] float16 of point `ids` [...]; zeros where the id is "" (no hit)."""
        rows = self.rows(ids)
        out = self.vectors[modality][np.maximum(rows, 0)]
        out[rows < 0] = 0
        return out


def vector_columns(memory: Any, directory: str | Path, progress: bool = True, keep: int = 1) -> VectorColumns:
    """Every point's two vectors of `memory` (a `Memory`) as memory-mapped float16 columns under `directory`, built
    by one scroll and reused while the memory is unchanged (keyed by its id and write version; `keep` versions kept).

    For many searches that need the hits' vectors (a training cache: N queries x k hits, often more
    vectors than the memory holds), asking the engine for ids only and gathering the vectors here with
    numpy avoids converting every hit's vectors to Python floats in the binding.
    """
    root = Path(directory)
    path = root / hashlib.sha1(f"{memory.uid}|{memory.write_version}".encode()).hexdigest()[:16]
    if not (path / "text.npy").exists():
        n, d = memory.count(), memory.dim
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{path.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cols = {m: np.lib.format.open_memmap(tmp / f"{m}.npy", "w+", np.float16, (n, d)) for m in VECTOR_NAMES}
        ids, row = np.empty(n, dtype="U36"), 0
        with progress_bar("memory vectors", n, progress) as advance:
            for recs in memory.scroll(4096, with_vectors=True):
                e = row + len(recs)
                ids[row:e] = [r.id for r in recs]
                for m, col in cols.items():
                    col[row:e] = np.asarray([r.vectors[m] for r in recs], np.float32)
                row = e
                advance(len(recs))
        if row != n:
            raise RecoMemoryError(f"memory {memory.cfg.location} changed while its vectors were read "
                               f"({row} points read, {n} counted): retry when writes have stopped")
        for col in cols.values():
            col.flush()
        del cols
        np.save(tmp / "ids.npy", ids)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    os.utime(path)
    for old in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp")),
                      key=lambda p: p.stat().st_mtime, reverse=True)[max(keep, 1):]:
        shutil.rmtree(old, ignore_errors=True)
    return VectorColumns(np.load(path / "ids.npy"), {m: np.load(path / f"{m}.npy", mmap_mode="r")
                                                     for m in VECTOR_NAMES})

