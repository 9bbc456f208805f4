"""A memory's points: a pair's point id, its embeddings checked before they are stored, and the neighbours a
search returns."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._deprecated import renamed_property
from .backends import Hits, RecoMemoryError

_ID_NAMESPACE = uuid.UUID("6f1c2b1e-8e0a-4c55-9d7e-2f2d1a0b7c11")


class EncoderMismatchError(RecoMemoryError):
    """Vectors or an encoder that do not match the encoder the memory was built with."""



def point_id(source: str, key: str | int) -> str:
    """Deterministic point id for an item: re-ingesting (source, key) updates instead of duplicating."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{source}\x1f{key}"))


def validate_embeddings(x: Any, name: str, dim: int | None = None, origin: str = "input",
                        row_offset: int = 0) -> np.ndarray:
    """Check an embedding matrix and return it float32 [N, d], L2-normalised.

    Rejects (naming `origin` and the row) non-2-D arrays, non-float dtypes, a dimension other than
    `dim`, NaN/inf values and zero vectors, rather than storing something that silently differs.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{origin}: {name} must be a 2-D array [N, d], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{origin}: {name} must be float16/32/64, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise EncoderMismatchError(f"{origin}: {name} have dimension {x.shape[1]}, expected {dim} "
                                   "(the dimension of this memory's encoder)")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0]) + row_offset
        raise ValueError(f"{origin}: {name} row {row} holds NaN or inf")
    if x.dtype.itemsize > 4 and x.size:
        big = (np.abs(x) > np.finfo(np.float32).max).any(axis=1)
        if big.any():
            raise ValueError(f"{origin}: {name} row {int(np.flatnonzero(big)[0]) + row_offset} holds values beyond "
                             "float32's range")
    x = x.astype(np.float32, copy=False)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]  # float64: no overflow at 1e20+
    if (norms <= 1e-12).any():
        row = int(np.flatnonzero(norms[:, 0] <= 1e-12)[0]) + row_offset
        raise ValueError(f"{origin}: {name} row {row} is a zero vector")
    off = np.abs(norms[:, 0] - 1.0) > 1e-6  # rows already unit-norm keep their exact bits (copies stay identical)
    if off.any():
        x = x.copy()
        x[off] = (x[off] / norms[off]).astype(np.float32)
    return x


@dataclass
class Neighbours:
    """k neighbours for each of B queries. Missing hits (fewer than k exist) have id "" and mask False."""

    ids: np.ndarray  # [B, k] str point ids
    scores: np.ndarray  # [B, k] float32 cosine similarity in the searched modality
    vectors: np.ndarray | None  # [B, k, d] float32 vectors of `return_modality`, L2-normalised
    payloads: list[list[dict[str, Any]]]  # [B][k]
    # [B, k, d] float32 the same neighbours' vectors in the searched modality (with_searched_vectors=True)
    searched_vectors: np.ndarray | None = None

    @property
    def captions(self) -> list[list[str]]:
        return [[p.get("caption", "") for p in row] for row in self.payloads]

    keys = renamed_property("Neighbours", "keys", "searched_vectors")

    @property
    def mask(self) -> np.ndarray:
        """[B, k] bool: True where a hit exists."""
        return self.ids != ""



def _content_key(vec: np.ndarray, caption: str) -> str:
    h = hashlib.sha1(vec.tobytes())
    h.update(caption.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _to_neighbours(hits: Hits, k: int, dim: int | None, searched_dim: int | None = None) -> Neighbours:
    """Backend `Hits` -> `Neighbours` [B, k], missing hits padded (id "", score -inf, zero vector);
    vectors re-normalised (quantised storage may drift)."""
    b = len(hits.ids)
    lengths = np.array([len(r) for r in hits.ids], np.int64)
    have = np.arange(k)[None, :] < lengths[:, None]  # [B, k]: where a hit exists
    full = bool(have.all())

    def pad(rows: list[list[Any]], fill: Any, dtype: Any) -> np.ndarray:
        if full:
            return np.array(rows, dtype).reshape(b, k)
        out = np.full((b, k), fill, dtype)
        out[have] = np.array([x for r in rows for x in r], dtype)
        return out

    def stack(flat: np.ndarray | None, d: int | None) -> np.ndarray | None:
        if not d:
            return None
        if full:
            out = flat.reshape(b, k, d)
        else:
            out = np.zeros((b, k, d), np.float32)
            if flat is not None and flat.size:
                out[have] = flat.reshape(-1, d)
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    ids = pad(hits.ids, "", object).astype(str)
    payloads = [row + [{} for _ in range(k - len(row))] for row in hits.payloads] if not full else hits.payloads
    return Neighbours(ids, pad(hits.scores, -np.inf, np.float32), stack(hits.vectors, dim), payloads,
                      stack(hits.searched, searched_dim))
