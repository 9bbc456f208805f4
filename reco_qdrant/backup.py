"""Backups and restores of a memory: its files copied while it stays readable, or a server's own snapshots."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import durable
from .backends import DISK_RESERVE, MemoryDamagedError, MemoryFullError, RecoMemoryError, tree_bytes
from .config import MemoryConfig

SNAPSHOT_MANIFEST = "qdrant-snapshots.json"  # what a server memory's backup directory holds (the snapshots stay there)


@dataclass(frozen=True)
class Restored:
    """What `Memory.restore` brought back: the memory's `points`, and whether that count was `verified`: compared
    with, and equal to, one exact count the backup acknowledged. A backup that records none cannot be verified
    (`why` says what it lacks): a server snapshot location given without the manifest `reco backup` writes, or a
    memory directory copied by hand while open (its ledger holds a range) or written by an older version."""

    points: int
    verified: bool
    why: str = ""  # when not verified: why the backup records no exact count


class BackupRestore:
    """`Memory.backup`, `snapshot` and `restore` (a mixin: it uses `backend`, `cfg`, `_write_lock` and `open`)."""

    backend: Any
    cfg: Any
    _write_lock: Any
    count: Any
    _ack_points: Any

    def backup(self, dest: str | Path) -> int:
        """Copy this embedded memory (collection, ledger, vector copy) to the new directory `dest`, consistent:
        writes from this process wait while it copies (another process cannot hold the memory), so the copy is
        one acknowledged state. Searches go on meanwhile. A server memory takes its own snapshots instead
        (`snapshot`), and `dest` gets their manifest. Returns the number of points copied."""
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(f"{dest}: already exists; back up into a new directory")
        if self.backend.storage_paths() is None:  # not ours to copy: the deployment's own snapshots
            return self._snapshot_into(dest)
        tmp = dest.with_name(f".{dest.name}.{_stage_tag()}.tmp")
        _warn_stale_stages(dest.parent, f".{dest.name}.")  # left by a backup that was killed
        try:
            with self._write_lock:
                self.backend.flush()
                points = self.count()
                if self.backend.has_collection():
                    self._ack_points(points)  # the copy's ledger says exactly which state it holds
                parts = self.backend.storage_paths()
                _check_room(dest, tree_bytes(parts), Path(self.cfg.location))
                tmp.mkdir(parents=True)
                for part in parts:
                    shutil.copytree(part, tmp / part.name, copy_function=_sparse_copy)
            durable.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no partial copy left beside DEST
            raise
        return points

    def snapshot(self) -> dict[str, Any]:
        """Server: Qdrant snapshots of the collection and of its ledger (`<collection>__meta`), taken and kept on
        the server (its snapshots directory). Writes from this process wait meanwhile; other processes' writes do
        not, so stop them for a consistent pair. Returns {"points", "snapshots": {collection: snapshot name},
        "urls": {collection: the REST URL that downloads it}}; `Memory.restore` recovers them."""
        base = self.cfg.location.rstrip("/")
        with self._write_lock:
            points = self.count()
            names = self.backend.snapshot()
        return {"points": points, "snapshots": names,
                "urls": {c: f"{base}/collections/{c}/snapshots/{n}" for c, n in names.items()}}

    def _snapshot_into(self, dest: Path) -> int:
        """Server backup: the snapshots stay on the server; `dest` (a new directory) gets their manifest."""
        snap = self.snapshot()
        manifest = {"kind": "qdrant-snapshots", "location": self.cfg.location, "collection": self.cfg.collection,
                    **snap}
        text = json.dumps(manifest, indent=2)
        tmp = dest.with_name(f".{dest.name}.{_stage_tag()}.tmp")
        try:
            _check_room(dest, len(text.encode()) + 4096, None)
            tmp.mkdir(parents=True)
            (tmp / SNAPSHOT_MANIFEST).write_text(text)
            durable.fsync_path(tmp / SNAPSHOT_MANIFEST)
            durable.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return int(snap["points"])

    @classmethod
    def restore(cls, backup: str | Path, location: str | Path, collection: str = "reco_memory", *,
                ledger_snapshot: str | None = None, **settings: Any) -> Restored:
        """Bring a `backup` back into `location` (a directory without that collection) and verify it: opening
        checks the engine's count against the count the backup's ledger acknowledged. Returns a `Restored`: the
        count, and whether it was verified against one exact count the backup recorded (see `Restored`).

        Into a directory, all or nothing: every part is copied into one staging directory inside `location` and
        opened (verified) there, then renamed into place; a failure removes whatever this restore had put there.

        `location` a server URL: `backup` is the directory `backup` wrote for a server (its manifest names the
        snapshots and the count to verify), or one snapshot location of the collection (http(s):// URL, or
        file:// path on the server; nothing to verify the count against), with `ledger_snapshot` for its `__meta`
        collection (else the encoder record and ledger start empty). The server fetches the snapshots itself
        (`recover_snapshot`; the API key goes only to URLs on that server); `settings` are `MemoryConfig` fields
        (api_key, TLS, ...)."""
        return restore_backup(cls, backup, location, collection, ledger_snapshot, settings)


def restore_backup(memory_cls: Any, backup: str | Path, location: str | Path, collection: str = "reco_memory",
            ledger_snapshot: str | None = None, settings: dict[str, Any] | None = None) -> Restored:
    """`Memory.restore`, for the `Memory` class `memory_cls` (which opens and verifies what was restored)."""
    settings = settings or {}
    if MemoryConfig(location=str(location)).kind != "edge":
        return _recover(memory_cls, str(backup), str(location), collection, ledger_snapshot, settings)
    backup, root = Path(backup), Path(location)
    if (backup / SNAPSHOT_MANIFEST).exists():
        raise ValueError(f"{backup}: a backup of a server memory (Qdrant snapshots, see {SNAPSHOT_MANIFEST}); "
                         "restore it into a server (--memory http://HOST:6333), or `reco copy` from there")
    if not (backup / f"{collection}__meta").exists():
        raise FileNotFoundError(f"{backup}: not a backup of collection {collection!r} (no {collection}__meta)")
    parts = [collection, f"{collection}__meta", f"{collection}__vectors"]
    held = [p for p in parts if (root / p).exists()]
    if held:
        raise FileExistsError(f"{root}: already holds collection {collection!r} ({', '.join(held)}); restore "
                              "into another directory or move it away first")
    root.mkdir(parents=True, exist_ok=True)
    stage = root / f".{collection}.restore.{_stage_tag()}.tmp"
    _warn_stale_stages(root, f".{collection}.restore.")  # left by a restore that was killed
    copied = [backup / p for p in parts if (backup / p).exists()]
    _check_room(stage, tree_bytes(copied), root, f"restore of backup {backup} into {root}",
                "restore into a directory on another disk")
    published: list[str] = []
    try:
        stage.mkdir()
        for part in parts:
            if (backup / part).exists():
                shutil.copytree(backup / part, stage / part, copy_function=_sparse_copy)
        durable.fsync_path(stage)
        done = _verify_staged(memory_cls, stage, collection, backup)
        for part in parts:
            if not (stage / part).exists():
                continue
            if (root / part).exists():
                raise FileExistsError(f"{root}: {part} appeared there while restoring (another process?); "
                                      "nothing of the backup was left there")
            try:
                os.rename(stage / part, root / part)
            except OSError as e:
                raise OSError(e.errno, f"restore into {root}: could not move {part} into place ({e.strerror}); "
                              "nothing of the backup was left there: fix that and run the restore again") from e
            published.append(part)
        durable.fsync_dir(root)
    except BaseException:
        for part in published:  # only what this restore put there
            shutil.rmtree(root / part, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return done

def _verify_staged(memory_cls: Any, stage: Path, collection: str, backup: Path) -> Restored:
    """Open the restored copy where it was staged: the count and sample checks verify it before it is published.
    A refusal names BACKUP (the staging directory is removed): the stage is only its copy."""
    missing, root = not (stage / collection).exists(), stage.parent
    nothing = f"nothing was restored into {root}"
    try:
        with memory_cls.open(str(stage), collection=collection, auto_index=False) as mem:
            n, check = mem.count(), mem.count_check
    except MemoryDamagedError as e:
        counts, problem = getattr(e, "counts", None), getattr(e, "problem", None)
        opt = "" if collection == "reco_memory" else f" --collection {collection}"
        adopt = (f"or, to restore it as it is deliberately, adopt the count on a copy of the backup "
                 f"(`cp -r {backup} COPY_OF_BACKUP && reco doctor --memory COPY_OF_BACKUP{opt} --accept-count`) "
                 f"and restore that copy (`reco restore COPY_OF_BACKUP --memory {root}{opt}`)")
        if missing and counts is not None:  # a ledger that acknowledged points, without the collection
            raise MemoryDamagedError(
                f"backup {backup}: no {collection}/ directory, but its ledger acknowledged {counts[1]} points; an "
                f"incomplete backup, {nothing}: restore from a complete backup, {adopt} (an empty memory)") from e
        if counts is not None:
            raise MemoryDamagedError(
                f"backup {backup}: its collection holds {counts[0]:,} points, but its ledger acknowledged "
                f"{counts[1]} (an incomplete backup, or parts of different backups); {nothing}: restore another "
                f"backup, {adopt}") from e
        if problem is not None:
            raise MemoryDamagedError(
                f"backup {backup}: {problem}; {nothing}: restore another backup, or check every point of a copy "
                f"of it (`cp -r {backup} COPY_OF_BACKUP && reco doctor --memory COPY_OF_BACKUP`)") from e
        raise MemoryDamagedError(f"backup {backup}: {_named(e, stage, backup)}; {nothing}") from e
    except MemoryFullError as e:  # the disk is ROOT's: the stage is inside it
        raise MemoryFullError(f"restore of backup {backup}: {_named(e, stage, root)}; {nothing}") from e
    except RecoMemoryError as e:
        raise type(e)(f"restore of backup {backup}: {_named(e, stage, backup)}; {nothing}") from e
    except OSError as e:
        said = f"restore of backup {backup}: {_named(e, stage, backup)}; {nothing}"
        raise (OSError(e.errno, said) if e.errno is not None else OSError(said)) from e
    except ValueError as e:
        raise ValueError(f"restore of backup {backup}: {_named(e, stage, backup)}; {nothing}") from e
    if check == "exact":
        return Restored(n, True)
    why = ("its ledger holds only a range of counts (a copy of a memory that was open, made without "
           "`reco backup`)" if check == "range" else "its ledger records no count (written by an older version)")
    return Restored(n, False, why)

def _recover(memory_cls: Any, backup: str, location: str, collection: str, ledger_snapshot: str | None,
             settings: dict[str, Any]) -> Restored:
    """Server restore: recover the snapshots into collections that do not exist yet, then verify the count."""
    from urllib.parse import urlsplit

    from qdrant_client import QdrantClient

    cfg = MemoryConfig(location=location, collection=collection, **settings).with_env()
    if cfg.kind == "local":
        raise ValueError("memory :memory: cannot be restored into: qdrant-client's local mode has no snapshots; "
                         "restore into a directory or a server URL")
    expected, meta = None, f"{collection}__meta"
    if (Path(backup) / SNAPSHOT_MANIFEST).exists():
        manifest = json.loads((Path(backup) / SNAPSHOT_MANIFEST).read_text())
        urls = manifest["urls"]
        was = manifest["collection"]
        expected = int(manifest["points"])
        sources = {collection: urls[was], meta: urls[f"{was}__meta"]}
    elif backup.startswith(("http://", "https://", "file://")):
        sources = {collection: backup, **({meta: ledger_snapshot} if ledger_snapshot else {})}
    elif Path(backup).exists():
        raise FileNotFoundError(f"{backup}: not a backup of a server memory (no {SNAPSHOT_MANIFEST}); an "
                                "embedded backup is restored into a directory (--memory DIR)")
    else:
        raise FileNotFoundError(f"{backup}: no such backup directory, and not a snapshot location "
                                "(http(s):// URL, or file:// path on the server)")

    def host(url: str) -> tuple[str, int | None] | None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            return None
        return u.hostname.lower(), u.port or (443 if u.scheme == "https" else 80)

    server = host(cfg.location)
    withheld: list[str] = []  # hosts of snapshot URLs the API key was not sent to (not the server's)
    client = QdrantClient(**cfg.client_kwargs())
    try:
        held = [c for c in sources if client.collection_exists(c)] + (
            [meta] if meta not in sources and client.collection_exists(meta) else [])
        if held:
            raise FileExistsError(f"{location} already holds collection {held[0]!r}; restore into another "
                                  "--collection or delete it first")
        started: list[str] = []  # collections this restore began to recover (only these are rolled back)
        try:  # all or nothing: none of these collections existed (checked above)
            for c, where in sources.items():
                # the server fetches `where` itself, sending this key: only to the server's own URLs
                key = cfg.api_key if server is not None and host(where) == server else None
                if cfg.api_key and key is None and host(where) is not None:
                    withheld.append(f"{host(where)[0]}:{host(where)[1]}")
                started.append(c)
                client.recover_snapshot(c, where, api_key=key, wait=True)
            if meta not in sources:
                started.append(meta)  # opening creates the ledger collection when no snapshot brought one
            with memory_cls.open(location, collection=collection, **settings) as mem:
                n = mem.count()
            if expected is not None and n != expected:
                raise MemoryDamagedError(f"memory {location} / {collection}: recovered {n:,} points, but the "
                                         f"backup {backup} holds {expected:,} (a snapshot short or damaged)")
        except BaseException as e:
            said = _drop_recovered(client, started, location)
            if isinstance(e, (KeyboardInterrupt, SystemExit)) or "timed out" in str(e).lower():
                said += ("; if the server was still recovering a snapshot when this stopped, it may finish "
                         f"later: check with `reco info --memory {location} --collection {collection}`")
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if withheld and server is not None:
                said += (f"; the API key was not sent to {', '.join(sorted(set(withheld)))} (not the server's "
                         f"own host, {server[0]}:{server[1]}): if the snapshot needs it, give its URL with the "
                         "server's own host name and port, or its file:// path on the server")
            if isinstance(e, RecoMemoryError):
                raise type(e)(f"{e}; {said}") from e
            raise RecoMemoryError(f"restore of {backup} into {location} / {collection} failed ({type(e).__name__}: "
                               f"{e}); {said}") from e
    finally:
        client.close()
    if expected is None:
        return Restored(n, False, f"a snapshot location, without the manifest ({SNAPSHOT_MANIFEST}) that `reco "
                                  "backup` writes")
    return Restored(n, True)

def _drop_recovered(client: Any, names: Sequence[str], location: str) -> str:
    """Delete the collections a failed server restore created (none existed before it); says what happened."""
    dropped, left = [], []
    for c in dict.fromkeys(names):
        try:
            if client.collection_exists(c):
                client.delete_collection(c)
                dropped.append(c)
        except Exception as x:  # noqa: BLE001 - said, with what to do
            left.append(f"{c} ({type(x).__name__}: {x})")
    if left:
        return (f"could not delete what this restore recovered: {', '.join(left)}; delete those collections on "
                f"{location} before restoring again (a restore into existing collections is refused), or restore "
                "into another --collection")
    done = f"deleted the collections this restore had recovered ({', '.join(dropped)})" if dropped else \
        "nothing had been recovered"
    return (f"{done}: nothing of it was left on {location}; restore again from another backup or snapshot, "
            "or from this one once the cause above is fixed")



def _sparse_copy(src: str, dst: str, *, follow_symlinks: bool = True) -> str:
    """`shutil.copy2` that keeps holes (as `cp --sparse=always` does for them): only the data ranges of `src`
    (SEEK_DATA/SEEK_HOLE) are written, so the engine's preallocated 32 MiB write-ahead-log segments cost what they
    hold, not their size. Falls back to a full copy where the filesystem cannot say where the holes are."""
    if (not follow_symlinks and os.path.islink(src)) or not hasattr(os, "SEEK_DATA") or not os.path.isfile(src):
        return shutil.copy2(src, dst, follow_symlinks=follow_symlinks)
    chunk = 2**20
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        os.fsync(fi.fileno())  # some filesystems report data not yet synced as holes
        before = os.fstat(fi.fileno())
        size = before.st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
                end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    break
                start, end = pos, size  # SEEK_DATA unsupported here: copy the rest whole
            while start < end:
                buf = os.pread(fi.fileno(), min(chunk, end - start), start)
                if not buf:
                    break
                os.pwrite(fo.fileno(), buf, start)
                start += len(buf)
            pos = end
        os.ftruncate(fo.fileno(), size)  # the holes at the end keep the file's length
        after = os.fstat(fi.fileno())
        if (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns):
            raise OSError(errno.EAGAIN, f"{src} changed while it was copied ({size:,} -> {after.st_size:,} bytes); "
                                        "the copy is not consistent: try again")
    shutil.copystat(src, dst)
    return dst


def _stage_tag() -> str:
    """`pid-random`: a staging name no other backup or restore (another thread, or a process elsewhere sharing the
    disk) uses at the same time."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _warn_stale_stages(parent: Path, prefix: str) -> None:
    """Say which staging directories `{prefix}{pid}-{random}.tmp` in `parent` were left by a backup or restore
    whose process is gone (killed): hidden, they would pile up. They are not removed: a process in another pid
    namespace or on another host sharing the disk may look gone while its copy goes on."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:-[0-9a-f]{8})?\.tmp")
    try:
        names = [e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    stale = []
    for name in names:
        m = pattern.fullmatch(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive: its copy may still be going on
        except ProcessLookupError:
            stale.append(str(parent / name))
        except (OSError, ValueError, OverflowError):
            continue  # not ours to judge (another user's process, a platform without signal 0)
    if stale:
        warnings.warn(f"{', '.join(stale)}: left by a backup or restore that was interrupted (its process is gone "
                      "here); delete once no backup or restore is running there", stacklevel=3)


def _check_room(dest: Path, need: int, memory_root: Path | None, what: str = "",
                elsewhere: str = "back up to another disk") -> None:
    """Refuse (before copying anything) a backup (or restore: `what`) that would not fit on DEST's disk; on the
    memory's own disk the engine's reserve (`DISK_RESERVE`) must stay free too."""
    probe = dest.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    same = memory_root is not None and os.stat(probe).st_dev == os.stat(memory_root).st_dev
    reserve = DISK_RESERVE if same else 0
    if free < need + reserve:
        mib = 2**20
        on = (f" plus the {reserve / mib:.0f} MiB the memory's engine keeps free for its write-ahead log"
              + ("" if what else " (DEST is on the memory's disk)")) if same else ""
        raise MemoryFullError(f"{what or f'backup {dest}'}: {free / mib:,.1f} MiB free on its disk, the copy needs "
                              f"about {need / mib:,.1f} MiB{on}; nothing was copied: free space there, or {elsewhere}")


def _named(e: BaseException, stage: Path, name: Path) -> str:
    """An error's message with the (removed) staging directory replaced by what it is a copy of."""
    return str(e).replace(str(stage), str(name))
