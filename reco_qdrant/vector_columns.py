"""Every point's vectors gathered by point id with numpy, for many searches that need their hits' vectors (a
training cache: N queries x k hits, often more vectors than the memory holds): the engine is asked for ids only.

One store, one gather: the vectors are read from a `VectorCopy` (`vector_copy.py`). An embedded memory's own copy
serves where it can be trusted (its rows are found by one scroll of the points' payloads, each checked against its
checksum); otherwise (a server, a memory without a copy, or one in doubt) one scroll of the vectors writes a copy of
the same format under a cache directory, reused while the memory is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import durable
from .backends import VECTOR_NAMES, RecoMemoryError
from .progress import progress_bar
from .vector_copy import VectorCopy

_BATCH = 4096
TMP_STALE_S = 24 * 3600  # a temporary copy older than this was left by a killed call (a build takes minutes)


class VectorColumns:
    """Point `ids` [M] and their `rows` [M] in `copy` (a `VectorCopy`), gathered by id."""

    def __init__(self, ids: np.ndarray, copy: VectorCopy, rows: np.ndarray) -> None:
        self.ids, self.copy = ids, copy
        self._row = dict(zip(ids.tolist(), np.asarray(rows, np.int64).tolist()))
        self._row[""] = -1  # no hit
        for name in copy.names if copy.rows else ():  # mapped now: pruned later (by another memory's call), a
            copy.gather(name, np.zeros(0, np.int64))  # written copy stays readable

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row in the copy of each point id (any shape); -1 for "" (no hit). Unknown ids: an error (stale)."""
        get = self._row.get
        flat = [get(i, -2) for i in np.asarray(ids).ravel().tolist()]
        rows = np.array(flat, np.int64).reshape(np.shape(ids))
        if (rows == -2).any():
            raise RecoMemoryError(f"point {np.asarray(ids).ravel()[int(np.argmax(rows.ravel() == -2))]} is not in the "
                                  "memory's vector columns: they are stale")
        return rows

    def gather(self, ids: np.ndarray, modality: str) -> np.ndarray:
        """Vectors [..., d] float32 of point `ids` [...]; zeros where the id is "" (no hit)."""
        rows = self.rows(ids)
        if not self.copy.rows:  # an empty memory: every id is "" (no hit)
            return np.zeros((*rows.shape, self.copy.dim), np.float32)
        out = self.copy.gather(modality, np.maximum(rows, 0))
        out[rows < 0] = 0
        return out


def vector_columns(memory: Any, directory: str | Path, progress: bool = True, keep: int = 1) -> VectorColumns:
    """Every point's two vectors of `memory` (a `Memory`), gathered by id: from the memory's own vector copy where it
    can be trusted, else from a copy written under `directory` by one scroll (keyed by the memory's id and write
    version, reused while it is unchanged; `keep` versions kept)."""
    if memory.dim is None:
        raise RecoMemoryError(f"memory {memory.cfg.location} holds no points yet: there are no vectors to gather")
    root = Path(directory)
    cols = _own_copy(memory, progress) or _written_copy(memory, root, progress)
    _prune(root, keep)
    return cols


def _own_copy(memory: Any, progress: bool) -> VectorColumns | None:
    """The embedded memory's own copy with every point's row, or None where it cannot serve them all."""
    probe = memory.backend.copy_rows([])
    if probe is None:
        return None
    ids, rows = [], []
    for recs in _every_point(memory, False, "memory vectors (rows)", progress):
        found = memory.backend.copy_rows(recs)
        if found is None:
            return None
        ids += [r.id for r in recs]
        rows += found[1].tolist()
    return VectorColumns(np.array(ids, dtype="U36"), probe[0], np.array(rows, np.int64))


def _written_copy(memory: Any, root: Path, progress: bool) -> VectorColumns:
    """A copy of every point's vectors written under `root` by one scroll, or the one written before for the same
    memory and write version (a directory that cannot be read as one is written again)."""
    path = root / hashlib.sha1(f"vector copy|{memory.uid}|{memory.write_version}".encode()).hexdigest()[:16]
    cols = _read_written(path, memory.dim)
    if cols is None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.", suffix=".tmp", dir=root))
        try:  # a failure or Ctrl-C leaves no partial directory behind
            _write(memory, tmp, progress)
            cols = _read_written(tmp, memory.dim)  # mapped now: a rename, or a later prune, leaves them readable
            if cols is None:
                raise RecoMemoryError(f"vector columns {tmp} cannot be read back after writing them: check the disk")
            if path.exists() and _read_written(path, memory.dim) is None:  # one that could not be read: set aside
                bad = Path(tempfile.mkdtemp(prefix=f"{path.name}.", suffix=".tmp", dir=root))
                try:
                    os.replace(path, bad / "old")
                except FileNotFoundError:  # removed by another call meanwhile
                    pass
                shutil.rmtree(bad, ignore_errors=True)
            try:
                durable.replace(tmp, path)
            except OSError:  # another call published the same version meanwhile: theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.utime(path)  # recently used: pruned last
    except FileNotFoundError:  # pruned by another call meanwhile: ours stay readable (mapped)
        pass
    return cols


def _prune(root: Path, keep: int) -> None:
    """Keep the `keep` most recently used written copies under `root`; remove temporary ones a killed call left."""
    if not root.is_dir():
        return
    dirs = [p for p in root.iterdir() if p.is_dir()]
    stale = time.time() - TMP_STALE_S
    for old in [p for p in dirs if p.name.endswith(".tmp") and _mtime(p) < stale] + sorted(
            (p for p in dirs if not p.name.endswith(".tmp")), key=_mtime, reverse=True)[max(keep, 1):]:
        shutil.rmtree(old, ignore_errors=True)  # those already open stay readable (mapped on opening)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _write(memory: Any, tmp: Path, progress: bool) -> None:
    """Every point's vectors into a new copy at `tmp`, its ids in `ids.npy` last."""
    copy = VectorCopy.create(tmp, memory.dim, VECTOR_NAMES)
    ids = []
    for recs in _every_point(memory, True, "memory vectors", progress):
        copy.append({m: np.asarray([r.vectors[m] for r in recs], np.float32) for m in VECTOR_NAMES})
        ids += [r.id for r in recs]
    np.save(tmp / "ids.npy", np.array(ids, dtype="U36"))


def _every_point(memory: Any, with_vectors: bool, label: str, progress: bool) -> Iterator[list[Any]]:
    """Every point of `memory`, batch by batch, under a progress bar; an error at the end where the count changed
    meanwhile (a write during the scroll: some points may have been missed or read twice)."""
    n, read = memory.count(), 0
    with progress_bar(label, n, progress) as advance:
        for recs in memory.scroll(_BATCH, with_vectors=with_vectors):
            yield recs
            read += len(recs)
            advance(len(recs))
    if read != n:
        raise RecoMemoryError(f"memory {memory.cfg.location} changed while its points were read "
                              f"({read} points read, {n} counted): retry when writes have stopped")


def _read_written(path: Path, dim: int) -> VectorColumns | None:
    """The written copy at `path`, opened; None where there is none, or not a whole one."""
    try:
        ids = np.load(path / "ids.npy")
        copy = VectorCopy.open(path, dim, VECTOR_NAMES)
        if copy is None or copy.rows != len(ids) or ids.ndim != 1:
            return None
        return VectorColumns(ids, copy, np.arange(len(ids)))
    except (OSError, ValueError, EOFError):
        return None
