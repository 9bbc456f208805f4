"""`reco doctor`: check a memory and say how to recover, instead of a panic, a traceback or a silent empty memory.

Checks, in order: the memory and its collection exist (else which collections here hold points); it opens (not in
use, files readable, ledger present); other collections beside it; its records (migrations, encoder, random
weights); every point is a whole pair (both vectors finite, unit-norm and of the memory's dimension;
a caption, source and key; the id derived from source and key); and whether it needs an index build.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import UncountedCollection, UnreadableCollection, count_edge_collection, edge_collections
from .config import MemoryConfig
from .ledger import _said_count
from .memory import (
    EXACT_SEARCH_BELOW,
    UNSPECIFIED,
    VECTOR_NAMES,
    Memory,
    MemoryDamagedError,
    MemoryInUseError,
    RecoMemoryError,
    index_due,
    point_id,
)


@dataclass
class Finding:
    level: str  # "ok" | "warning" | "problem"
    what: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_memory(location: str | None = None, collection: str = "reco_memory", deep: bool = True,
                 repair_ledger: bool = False, examples: int = 5, accept_count: bool = False) -> list[Finding]:
    """Findings about the memory at `location` (directory or URL); `deep` reads every point.

    With `repair_ledger`, a missing ledger of an embedded memory is rebuilt from its collection first; with
    `accept_count`, the engine's point count is adopted where it differs from the one the ledger acknowledged.
    """
    cfg = MemoryConfig(location=location) if location else MemoryConfig()
    if cfg.kind == "edge" and not Path(cfg.location).exists():  # never create a memory just to look at it
        return [Finding("problem", f"memory {cfg.location}: no such directory, so no memory there",
                        "check --memory / $RECO_MEMORY; `reco ingest ...` or `reco migrate` creates one")]
    if cfg.kind == "edge" and collection not in edge_collections(cfg.location):  # nor a collection
        held = {n: count_edge_collection(cfg.location, n) for n in edge_collections(cfg.location)}
        if not held:
            return [Finding("warning", f"memory {cfg.location} holds no collection (nothing ingested there)",
                            f"`reco ingest images FOLDER --captions TABLE --memory {cfg.location}` fills it")]
        return [Finding("warning", f"memory {cfg.location} has no collection {collection!r}; the data here are in "
                        f"{collections_said(held)}", f"select it with --collection {fullest_collection(held)}"),
                *unreadable_collections(cfg.location, held)]
    try:
        # with --accept-count the count is adopted before migrating (a gone collection is re-created only then)
        mem = Memory.open(location, collection=collection, auto_index=False,
                          migrate=repair_ledger and not accept_count,
                          repair_ledger=repair_ledger, check_count=not accept_count,  # adopted below, if whole
                          check_sample=False)  # every point is read below (deep), not a sample
    except MemoryInUseError as e:
        return [Finding("problem", str(e), "stop the other process (its pid is in the directory's .lock file)")]
    except MemoryDamagedError as e:
        return [Finding("problem", str(e))]
    except (RecoMemoryError, ValueError, OSError) as e:
        return [Finding("problem", f"memory {location}: {e}")]
    with mem:
        adopted: list[Finding] = []
        if repair_ledger and accept_count:
            try:
                if not mem.backend.has_collection():  # gone: adopt the empty engine, then the migrations re-create it
                    adopted.append(_adopt_count(mem, True, []))
                if mem.dim is not None or mem.backend.has_collection():
                    mem.migrate()
            except (RecoMemoryError, ValueError, OSError) as e:
                return [Finding("problem", f"memory {location}: {e}")]
        found = [Finding("ok", f"opens: {mem.cfg.location} / {collection}, {mem.count():,} points"), *adopted]
        found += _other_collections(mem, collection)
        if repair_ledger:
            if mem.encoder_record is None and mem.count():
                first = next(mem.scroll(1, with_vectors=True))[0]
                mem.check_encoder(None, len(first.vectors["image"]), record=True)  # "unspecified", its dimension
            found.append(Finding("ok", "ledger rebuilt from the collection"))
        found += _records(mem)
        points = _points(mem, examples) if deep and mem.count() else []
        found += points
        if accept_count and not adopted:
            found.append(_adopt_count(mem, deep, points))
        found += _index(mem)
    return found


def _adopt_count(mem: Memory, deep: bool, points: list[Finding]) -> Finding:
    """`--accept-count`: the ledger acknowledges the engine's count, once every point was read and found whole."""
    rec, now = mem._acknowledged(), mem.count()
    said = "nothing" if rec is None else _said_count(rec)
    if rec == [now, now]:
        return Finding("ok", f"the ledger already acknowledges the engine's {now:,} points: nothing to adopt")
    if not deep:
        return Finding("problem", f"count not adopted (the ledger acknowledged {said}, the engine holds {now:,}): "
                       "--accept-count reads every point first", "run it without --quick")
    if any(f.level == "problem" for f in points):
        return Finding("problem", f"count not adopted (the ledger acknowledged {said}, the engine holds {now:,}): "
                       "the check above found damaged points", "restore the memory from a backup (`reco restore`), "
                       "or re-ingest the damaged points' sources; adopt the count once `reco doctor` finds every "
                       "point whole")
    was, now = mem.accept_count()
    return Finding("ok", f"count adopted: the ledger now acknowledges the engine's count: was {was}, now {now:,}")


def _records(mem: Memory) -> list[Finding]:
    out = []
    pending = mem.pending_migrations()
    if pending:
        out.append(Finding("warning", f"pending migrations: {', '.join(pending)}", "reco migrate"))
    rec = mem.encoder_record
    if rec is None and mem.count():
        out.append(Finding("problem", "points but no encoder record", "reco migrate --encoder-id ID --dim D"))
    elif rec is not None and rec["id"] == UNSPECIFIED:
        out.append(Finding("warning", "the encoder is not recorded ('unspecified'): searches cannot check it",
                           "reco migrate --encoder-id ID"))
    elif rec is not None:
        out.append(Finding("ok", f"encoder {rec['id']} ({rec['dim']}-d)"))
        if random_weights(rec["id"]):
            out.append(Finding("warning", f"the encoder {rec['id']} has random weights (ingested with --pretrained "
                               "none): a dry run; its neighbours and predictions carry no meaning",
                               "ingest into a new memory (or --collection) with pretrained weights: --pretrained "
                               "TAG or a checkpoint file"))
    return out


def random_weights(encoder_id: str) -> bool:
    """Whether an encoder id names random weights (`open_clip/<model>/random-seed<N>`: pretrained none)."""
    parts = encoder_id.split("/")
    return len(parts) == 3 and parts[0] == "open_clip" and parts[2].startswith("random-seed")


# collection -> points (None: in use elsewhere; Uncounted: the disk is too full to load it)
Held = dict[str, int | UnreadableCollection | UncountedCollection | None]


def collections_said(held: Held) -> str:
    """'reco_demo (4,000 points), other (in use by another process), old (unreadable by the engine)'."""
    def said(c: int | UnreadableCollection | UncountedCollection | None) -> str:
        if c is None:
            return "in use by another process"
        if isinstance(c, UncountedCollection):
            return f"points not counted: {c.why}"
        return "unreadable by the engine" if isinstance(c, UnreadableCollection) else f"{c:,} points"

    return ", ".join(f"{n} ({said(c)})" for n, c in held.items())


def fullest_collection(held: Held) -> str:
    """The collection holding the most points (the one to suggest with --collection), a readable one first."""
    return max(held, key=lambda n: (not isinstance(held[n], UnreadableCollection),
                                    held[n] if isinstance(held[n], int) else 0))


def unreadable_collections(location: str, held: Held) -> list[Finding]:
    """A warning for each collection here the engine cannot read (not the one asked about: that one's opening
    says what is wrong), naming it and the check that says how to recover it."""
    return [Finding("warning", f"collection {n!r} beside it cannot be read by the engine ({c.why})",
                    f"`reco doctor --memory {location} --collection {n}` checks it and says how to recover")
            for n, c in held.items() if isinstance(c, UnreadableCollection)]


def _other_collections(mem: Memory, collection: str) -> list[Finding]:
    """Collections beside this one that hold points: a warning when this one is empty (the data are elsewhere:
    the demo writes `reco_demo`), else an ok line naming them."""
    others = {n: c for n, c in mem.collections().items() if n != collection and c != 0}
    unreadable = unreadable_collections(mem.cfg.location, others)
    if not others:
        return []
    if mem.count() == 0:
        return [Finding("warning", f"collection {collection!r} is empty; the points here are in "
                        f"{collections_said(others)}", f"select it with --collection {fullest_collection(others)}"),
                *unreadable]
    readable = {n: c for n, c in others.items() if not isinstance(c, UnreadableCollection)}
    said = [Finding("ok", f"other collections here: {collections_said(readable)} (--collection selects one)")]
    return [*(said if readable else []), *unreadable]


def _points(mem: Memory, examples: int) -> list[Finding]:
    bad: dict[str, list[str]] = {}
    seen, stale = 0, []  # stale: points whose row in the vector copy does not hold their vectors
    rows = mem.backend.vector_copy_rows()  # None: the memory keeps no vector copy
    for recs in mem.scroll(1024, with_vectors=True):
        for r in recs:
            seen += 1
            for why in _point_problems(r, mem.dim):
                bad.setdefault(why, []).append(r.id)
        stale += mem.backend.stale_copy_rows(recs) or []
    out = [Finding("ok" if not bad else "problem", f"{seen:,} points read")]
    if rows is not None:
        out.append(Finding("ok", f"vector copy: every point's row holds its vectors ({rows:,} rows)") if not stale
                       else Finding("warning", f"vector copy of {mem.cfg.location}: {len(stale):,} points have no "
                                    f"row or another point's vectors there (e.g. {', '.join(stale[:examples])}); "
                                    "searches notice and read vectors from the engine (slower)",
                                    "`reco copy` this memory into a new one: the new one has a fresh copy"))
    if seen != mem.count():
        out.append(Finding("problem", f"{seen:,} points read but {mem.count():,} counted",
                           "re-ingest the memory's sources into a fresh memory"))
    for why, ids in bad.items():
        out.append(Finding("problem", f"{len(ids):,} points {why} (e.g. {', '.join(ids[:examples])})",
                           "re-ingest their sources (same --source) to rewrite them, or delete them by id"))
    return out


def _point_problems(r: Any, dim: int | None) -> list[str]:
    out = []
    for m in VECTOR_NAMES:
        v = r.vectors.get(m)
        if v is None:
            out.append(f"lack their {m} vector")
            continue
        v = np.asarray(v, np.float32)
        if v.shape != (dim,):
            out.append(f"have {m} vectors of dimension {v.shape[-1] if v.ndim else 0}, not {dim}")
        elif not np.isfinite(v).all():
            out.append(f"hold NaN or inf in their {m} vector")
        elif abs(float(np.linalg.norm(v.astype(np.float64))) - 1.0) > 1e-2:
            out.append(f"have {m} vectors that are not unit-norm (damaged storage)")
    p = r.payload
    if not isinstance(p.get("caption"), str) or not p["caption"].strip():
        out.append("lack a caption")
    if "source" not in p or "key" not in p:
        out.append("lack their source or key")
    elif point_id(p["source"], p["key"]) != r.id:
        out.append("have ids that do not derive from their source and key")
    return out


def _index(mem: Memory) -> list[Finding]:
    points, unindexed = mem.index_backlog()
    if index_due(points, unindexed):
        return [Finding("warning", f"{unindexed:,} vectors unindexed: searches are slow until the index is built",
                        "open the memory with Memory.open (it indexes itself before searching) or run `reco search`")]
    if points <= EXACT_SEARCH_BELOW:
        return [Finding("ok", "index: small enough to be searched exactly")]
    return [Finding("ok", f"index: {unindexed:,} of {points * len(VECTOR_NAMES):,} vectors waiting to be indexed")]
