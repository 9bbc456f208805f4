"""Sources -> (encoder) -> memory: batched, idempotent and resumable, with progress bars."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .encoders import Encoder
from .memory import Memory, point_id
from .progress import progress_bar
from .sources import Source

__all__ = ["EncodedPairs", "IngestReport", "cache_root", "copy_memory", "encode_pairs", "ingest"]


@dataclass
class IngestReport:
    source: str
    added: int  # new points written in this run
    updated: int  # points that already existed (same source and key) and were replaced
    skipped_batches: int  # batches already done by an earlier (interrupted) run
    seconds: float
    items_per_s: float
    count: int  # points in the memory afterwards
    indexed: bool  # whether an index build ran
    replaced_duplicates: int = 0  # rows replaced by a later shard's row of the same key (duplicates="last")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingest(memory: Memory, source: Source, encoder: Encoder | None = None, *, encoder_id: str | None = None,
           progress: bool = True, resume: bool = True, optimize: bool = True) -> IngestReport:
    """Upsert every pair of `source` into `memory`.

    Point ids derive from (source name, key), so a re-run adds no duplicates; a ledger in the
    memory records finished batches, so a re-run after an interruption continues where it stopped
    and ends with the same points as an uninterrupted run.

    Args:
        encoder: needed when the source yields images; its id is checked against the memory's.
        encoder_id: for precomputed embeddings, the id of the encoder that made them.
        resume: skip batches an earlier run finished (False re-upserts everything).
        optimize: build the index afterwards when the memory is large enough to need one.
    """
    if encoder is not None:
        encoder_id = encoder.id
        memory.check_encoder(encoder.id, encoder.dim)
    legacy = getattr(source, "legacy_name", None)
    if legacy and legacy != source.name and memory.count(legacy):
        raise ValueError(f"memory {memory.cfg.location} holds {memory.count(legacy):,} points of source {legacy!r} "
                         f"(named by folder basename by reco-qdrant 0.1); sources are now named by their path "
                         f"({source.name!r}), so this ingest would store them twice: pass source={legacy!r} "
                         "(--source) to update those points, or another name to keep both")
    fingerprint = source.fingerprint()
    files = getattr(source, "files_fingerprint", None)  # an image folder: the images, not only the table
    if files is not None:
        fingerprint = f"{fingerprint}:{files()}"
    state_key = f"ingest:{memory.collection_uid}:{source.name}:{fingerprint}"
    state = (memory.get_state(state_key) if resume else None) or {"batches": 0, "items": 0}
    skip = int(state["batches"])
    total = source.total()
    t0, added, updated = time.perf_counter(), 0, 0
    with progress_bar(f"ingest {source.name}", total, progress) as advance:
        advance(int(state["items"]))
        for batch in source.batches(skip=skip):
            img, txt = batch.image_embeddings, batch.text_embeddings
            if batch.images is not None:
                if encoder is None:
                    raise ValueError(f"{batch.origin}: this source holds images; pass an encoder to embed them")
                img = encoder.encode_images(batch.images)
                txt = encoder.encode_texts(batch.captions)
            existing = len(memory.existing_ids([point_id(source.name, k) for k in batch.keys]))
            memory.add_embeddings(img, txt, batch.captions, ids=batch.keys, source=source.name,
                                  payloads=batch.payloads, encoder_id=encoder_id, origin=batch.origin,
                                  row_offset=batch.row_offset, encoder_spec=getattr(encoder, "spec", None))
            state_key = f"ingest:{memory.collection_uid}:{source.name}:{fingerprint}"  # uid created by the 1st add
            state = {"batches": state["batches"] + 1, "items": state["items"] + len(batch.keys)}
            memory.flush()  # the batch is on disk before the ledger says so: a power cut cannot lose a batch
            memory.set_state(state_key, state)  # that a resume would skip; a crash in between only re-does it
            added += len(batch.keys) - existing
            updated += existing
            advance(len(batch.keys))
    memory.flush()
    seconds = time.perf_counter() - t0
    indexed = optimize and memory.ensure_indexed(progress=progress)
    return IngestReport(source.name, added, updated, skip, seconds,
                        (added + updated) / seconds if seconds > 0 else 0.0, memory.count(), bool(indexed),
                        int(getattr(source, "replaced_duplicates", 0)))


def copy_memory(src: Memory, dst: Memory, batch: int = 1024, progress: bool = False) -> int:
    """Copy every point of `src` into `dst` (embedded -> server, or back); returns the number copied.

    Point ids derive from (source, key) and the payload keeps both, so ids are preserved and copying
    again is idempotent. The destination must be empty or hold vectors of the same encoder.
    """
    rec = src.encoder_record
    if rec is None:
        return 0
    extra = {k: v for k, v in rec.items() if k not in ("id", "dim")}
    dst.check_encoder(rec["id"], rec["dim"], record=True, extra=extra)
    done = 0
    with progress_bar(f"copy to {dst.cfg.location}", src.count(), progress) as advance:
        for recs in src.scroll(batch, with_vectors=True):
            by_source: dict[str, list] = {}
            for r in recs:
                by_source.setdefault(r.payload.get("source", "default"), []).append(r)
            for source, group in by_source.items():
                dst.add_embeddings(np.array([r.vectors["image"] for r in group], np.float32),
                                   np.array([r.vectors["text"] for r in group], np.float32),
                                   [r.payload["caption"] for r in group], ids=[r.payload["key"] for r in group],
                                   source=source, payloads=[r.payload for r in group], encoder_id=rec["id"],
                                   origin=f"{src.cfg.location} -> {dst.cfg.location}")
            done += len(recs)
            advance(len(recs))
    dst.flush()
    dst.ensure_indexed(progress=progress)
    return done


def cache_root() -> Path:
    """Where reco-qdrant caches what it computed: $RECO_CACHE_DIR, else $XDG_CACHE_HOME/reco_qdrant, else
    ~/.cache/reco_qdrant."""
    if os.environ.get("RECO_CACHE_DIR"):
        return Path(os.environ["RECO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reco_qdrant"


@dataclass
class EncodedPairs:
    keys: list[str]  # the source's keys: with its name they give the point ids the pairs have when ingested
    captions: list[str]
    image_embeddings: np.ndarray  # [N, d] float32, L2-normalised
    text_embeddings: np.ndarray  # [N, d]
    payloads: list[dict[str, Any]]  # the table's other columns, per pair
    cache_path: Path
    from_cache: bool  # read back from an earlier run, nothing encoded


def encode_pairs(source: Source, encoder: Encoder, cache_dir: str | Path | None = None,
                 progress: bool = True) -> EncodedPairs:
    """Every pair of an image source (e.g. an `ImageFolder`) embedded by `encoder`, as training pairs.

    The embeddings are cached under `cache_dir` (default `cache_root()/embeddings`), keyed by a digest of the
    encoder id, the source's name and every file's path, size and modification time: a second call on the same
    files reads them back instead of encoding again."""
    files = getattr(source, "files_fingerprint", None)
    digest = hashlib.sha256(json.dumps([encoder.id, source.name, source.fingerprint(),
                                        files() if files else ""]).encode()).hexdigest()[:24]
    path = Path(cache_dir or cache_root() / "embeddings") / f"{digest}.npz"
    cached = _read_encoded(path, source.total(), getattr(encoder, "dim", None))
    if cached is not None:
        return cached
    keys, captions, payloads, img, txt = [], [], [], [], []
    with progress_bar(f"encode {Path(source.name).name or source.name}", source.total(), progress) as advance:
        for batch in source.batches():
            if batch.images is None:
                raise ValueError(f"{batch.origin}: this source holds embeddings, not images: nothing to encode")
            img.append(encoder.encode_images(batch.images))
            txt.append(encoder.encode_texts(batch.captions))
            keys += batch.keys
            captions += batch.captions
            payloads += batch.payloads or [{} for _ in batch.keys]
            advance(len(batch.keys))
    if not keys:
        raise ValueError(f"{source.name}: no pairs to encode")
    image, text = np.concatenate(img), np.concatenate(txt)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_writes(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, keys=np.array(keys, str), captions=np.array(captions, str), image=image, text=text,
                 payloads=np.array(json.dumps(payloads, default=str)))
        os.replace(tmp, path)  # whole or absent: a killed run leaves no half-written cache
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return EncodedPairs(keys, captions, image, text, payloads, path, False)


def _read_encoded(path: Path, n: int | None, dim: int | None) -> EncodedPairs | None:
    """The cached pairs at `path`, or None when there are none usable: a missing, truncated, empty or otherwise
    unreadable file, or one whose arrays do not fit together (n pairs when known, dim columns) is a miss, never
    trusted."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, captions = z["keys"].tolist(), z["captions"].tolist()
            image, text = np.asarray(z["image"], np.float32), np.asarray(z["text"], np.float32)
            payloads = json.loads(str(z["payloads"]))
    except Exception:  # BadZipFile, EOFError, OSError, ValueError, KeyError, a JSON error, ...: recompute
        return None
    if not (isinstance(keys, list) and isinstance(captions, list) and isinstance(payloads, list)):
        return None
    if image.ndim != 2 or text.ndim != 2 or image.shape != text.shape or (dim and image.shape[1] != dim):
        return None
    if not len(keys) == len(captions) == len(payloads) == image.shape[0] or n not in (None, image.shape[0]):
        return None
    return EncodedPairs(keys, captions, image, text, payloads, path, True)


def _remove_stale_writes(path: Path) -> None:
    """Remove `path`'s temporary files left by writes that failed (their process is gone): a killed or failed
    run must not leave them to pile up. A write still in progress in a live process is left alone."""
    for tmp in path.parent.glob(f"{path.stem}.*.tmp.npz"):
        pid = tmp.name[len(path.stem) + 1:-len(".tmp.npz")]
        if not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # alive: its write may still be going on
            except ProcessLookupError:
                pass
            except (OSError, ValueError, OverflowError):
                continue  # not ours to judge (another user's process, a platform without signal 0)
        tmp.unlink(missing_ok=True)
