"""`reco` commands that fill, inspect, move and keep a memory: migrate, ingest, doctor, info, search, copy, backup,
restore, dedup."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..config import MemoryConfig
from .base import (
    CaptionColumnOpt,
    CollectionOpt,
    FileColumnOpt,
    JsonOpt,
    KindOpt,
    MemoryOpt,
    ModelOpt,
    PretrainedOpt,
    ProgressOpt,
    _emit,
    _encoder,
    _hint_on,
    _load_shards,
    _must_exist,
    _open,
    app,
    cli_errors,
    err,
    ingest_app,
    out,
)


@app.command()
@cli_errors
def migrate(memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
            dim: Annotated[int | None, typer.Option(help="embedding dimension (needed for a new memory)")] = None,
            encoder_id: Annotated[str | None, typer.Option(help="record this encoder id with the memory")] = None,
            quantization: Annotated[str | None, typer.Option(
                help="int8 (default: int8 in RAM, searched with rescoring) | binary (2 bits a dimension in RAM, "
                     "rescored: for the largest memories) | none (float vectors only)")] = None,
            on_disk: Annotated[bool, typer.Option(help="original vectors on disk (mmap)")] = False,
            vector_copy: Annotated[bool, typer.Option(
                help="embedded: a float32 copy of the vectors beside the collection, from which hits' vectors "
                     "are read (about 2x faster searches that return vectors; 2 x 4 x dim more bytes on disk per "
                     "pair)")] = True,
            shards: Annotated[int, typer.Option(help="server: number of shards")] = 1,
            replicas: Annotated[int, typer.Option(help="server: replication factor")] = 1,
            as_json: JsonOpt = False) -> None:
    """Apply pending schema migrations (creates the collection the first time). Idempotent."""
    layout = {} if quantization is None else {"quantization": None if quantization == "none" else quantization}
    with _open(memory, collection, migrate=False, on_disk=on_disk, shard_number=shards,
               replication_factor=replicas, vector_copy=vector_copy, **layout) as mem:
        if dim is not None:
            mem.check_encoder(encoder_id, dim, record=True)
        applied = mem.migrate(dim)
        pending = mem.pending_migrations()
    if as_json:
        _emit({"applied": applied, "pending": pending}, True)
    else:
        out.print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")


def _run_ingest(memory: str | None, collection: str, source: Any, encoder: Any, encoder_id: str | None,
                workers: int, progress: bool, restart: bool, as_json: bool) -> None:
    from ..ingest import ingest

    with _open(memory, collection, encoder=encoder, upload_workers=workers) as mem:
        rep = ingest(mem, source, encoder, encoder_id=encoder_id, progress=progress, resume=not restart)
    if as_json:
        _emit(rep.to_dict(), True)
    else:
        out.print(f"{rep.source}: {rep.added:,} added, {rep.updated:,} updated in {rep.seconds:.1f} s "
                  f"({rep.items_per_s:,.0f} it/s), {rep.skipped_batches} batches already done; memory holds "
                  f"{rep.count:,} points" + (" (index built)" if rep.indexed else ""))
        if rep.updated:
            err.print(f"[yellow]note:[/] {rep.updated:,} points already existed under source {rep.source!r} with the "
                      "same keys and were replaced; use --source to store another data set beside them",
                      highlight=False)
        if rep.replaced_duplicates:
            err.print(f"[yellow]note:[/] {rep.replaced_duplicates:,} rows replaced by a later shard's row of the same "
                      "key (--duplicates last): the last shard's row was kept", highlight=False)


SourceOpt = Annotated[str | None, typer.Option(
    help="source name stored with each pair (default: the folder's full path); point ids derive from source + key, "
         "so the same name updates those pairs and another name stores the data beside them")]
UPLOAD_WORKERS = MemoryConfig.upload_workers
WorkersOpt = Annotated[int, typer.Option(
    "--upload-workers", min=1, help="a server memory: upsert requests (of 512 pairs) in flight at once within a "
                                    "batch; a batch is stored, and the resume ledger moves past it, once all of "
                                    "its requests are (image batches of 64 are one request each)")]
RestartOpt = Annotated[bool, typer.Option(
    help="ignore the resume ledger: re-encode and re-store every batch (an ingest otherwise skips the batches an "
         "earlier run of the same files finished)")]
ImageBatchOpt = Annotated[int, typer.Option(help="images encoded per batch (one resume step)")]
IMAGES_LAYOUT_HINT = ("images with a captions table? `reco ingest images FOLDER --captions TABLE` (or `reco ingest "
                      "auto FOLDER` when the table sits in FOLDER as captions.csv|parquet)")


@ingest_app.command("embeddings")
@cli_errors
def ingest_embeddings(path: Annotated[Path, typer.Argument(help="folder with img_emb/ text_emb/ metadata/")],
                      memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                      caption_column: Annotated[str, typer.Option(
                          help="the metadata's column of captions")] = "caption",
                      key_column: Annotated[str | None, typer.Option(
                          help="the metadata's column of keys unique within the source (default: shard and "
                               "row)")] = None,
                      source: SourceOpt = None,
                      encoder_id: Annotated[str | None, typer.Option(help="id of the encoder that made them")] = None,
                      batch_size: Annotated[int, typer.Option(help="pairs stored per batch (one resume step)")] = 4096,
                      duplicates: Annotated[str, typer.Option(
                          help="a key held by more than one shard: 'error' (refused, naming both files) or 'last' "
                               "(the last shard's row is kept, and the replaced rows are reported)")] = "error",
                      workers: WorkersOpt = UPLOAD_WORKERS,
                      progress: ProgressOpt = True, restart: RestartOpt = False, as_json: JsonOpt = False) -> None:
    """Precomputed embeddings in the clip-retrieval / LAION layout (.npy + parquet)."""
    from ..sources import EmbeddingShards

    layout = (path / "img_emb").is_dir()  # without it, the folder may be one of images
    with contextlib.nullcontext() if layout else _hint_on(FileNotFoundError, IMAGES_LAYOUT_HINT):
        src = EmbeddingShards(path, caption_column, key_column, source, batch_size, duplicates)
    _run_ingest(memory, collection, src, None, encoder_id, workers, progress, restart, as_json)


@ingest_app.command("auto")
@cli_errors
def ingest_auto(path: Annotated[Path, typer.Argument(
                    help="a folder in either layout: img_emb/ text_emb/ metadata/, or images + captions.csv|parquet")],
                memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory", source: SourceOpt = None,
                model: ModelOpt = None, pretrained: PretrainedOpt = None, encoder_kind: KindOpt = "open_clip",
                encoder_id: Annotated[str | None, typer.Option(
                    help="embeddings: id of the encoder that made them")] = None,
                workers: WorkersOpt = UPLOAD_WORKERS,
                progress: ProgressOpt = True, restart: RestartOpt = False, as_json: JsonOpt = False) -> None:
    """A data folder whose layout is found by looking at it (what the compose `ingest` service runs)."""
    from ..sources import EmbeddingShards, open_folder

    with _hint_on(FileNotFoundError, "give a folder in one of the two layouts (`reco ingest images FOLDER --captions "
                                     "TABLE` reads a table kept elsewhere)"):
        src = open_folder(path, source)
    enc = None if isinstance(src, EmbeddingShards) else _encoder(model, pretrained, encoder_kind, memory, collection)
    _run_ingest(memory, collection, src, enc, encoder_id if enc is None else None, workers, progress, restart, as_json)


@ingest_app.command("images")
@cli_errors
def ingest_images(folder: Annotated[Path, typer.Argument(help="the image folder (file names in the table are "
                                                               "relative to it)")],
                  captions: Annotated[Path, typer.Option(help="table: file -> caption (.csv, .tsv, .parquet or "
                                                              ".jsonl)")],
                  memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                  file_column: FileColumnOpt = "file", caption_column: CaptionColumnOpt = "caption",
                  source: SourceOpt = None, model: ModelOpt = None, pretrained: PretrainedOpt = None,
                  encoder_kind: KindOpt = "open_clip", batch_size: ImageBatchOpt = 64,
                  workers: WorkersOpt = UPLOAD_WORKERS, progress: ProgressOpt = True,
                  restart: RestartOpt = False, as_json: JsonOpt = False) -> None:
    """An image folder plus a captions table (parquet/csv/jsonl), encoded with the given model."""
    from ..sources import ImageFolder

    with _hint_on(FileNotFoundError, "check FOLDER and --captions (file names in the table are relative to "
                                     "FOLDER; --file-column names their column)"):
        src = ImageFolder(folder, captions, file_column, caption_column, source, batch_size)
    enc = _encoder(model, pretrained, encoder_kind, memory, collection)
    with _hint_on(FileNotFoundError, "file names in the table are relative to FOLDER: check FOLDER and "
                                     "--file-column"):
        _run_ingest(memory, collection, src, enc, None, workers, progress, restart, as_json)


@ingest_app.command("webdataset")
@cli_errors
def ingest_webdataset(shards: Annotated[list[Path], typer.Argument(help=".tar shards")],
                      memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                      source: SourceOpt = None, model: ModelOpt = None,
                      pretrained: PretrainedOpt = None, encoder_kind: KindOpt = "open_clip",
                      batch_size: ImageBatchOpt = 64,
                      workers: WorkersOpt = UPLOAD_WORKERS, progress: ProgressOpt = True, restart: RestartOpt = False,
                      as_json: JsonOpt = False) -> None:
    """WebDataset tar shards (KEY.jpg + KEY.txt), read in memory and encoded with the given model."""
    from ..sources import WebDataset

    src = WebDataset(shards, source, batch_size)
    enc = _encoder(model, pretrained, encoder_kind, memory, collection)
    _run_ingest(memory, collection, src, enc, None, workers, progress, restart, as_json)


@app.command()
@cli_errors
def doctor(memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
           quick: Annotated[bool, typer.Option(help="skip reading every point")] = False,
           repair_ledger: Annotated[bool, typer.Option(
               help="rebuild a missing ledger from the collection (embedded memories)")] = False,
           accept_count: Annotated[bool, typer.Option(
               help="adopt the engine's point count where it differs from the one the ledger acknowledged (after a "
                    "deliberate change made outside reco-qdrant; embedded memories)")] = False,
           as_json: JsonOpt = False) -> None:
    """Check a memory (opens, records, every point whole, index) and say how to recover. Exit 1 on a problem."""
    from ..doctor import check_memory

    found = check_memory(memory, collection, deep=not quick, repair_ledger=repair_ledger, accept_count=accept_count)
    if as_json:
        _emit([f.to_dict() for f in found], True)
    for f in [] if as_json else found:
        style = {"ok": "green", "warning": "yellow", "problem": "red"}[f.level]
        out.print(f"[{style}]{f.level}[/]: {f.what}" + (f"\n  fix: {f.fix}" if f.fix else ""), highlight=False)
    if any(f.level == "problem" for f in found):
        raise typer.Exit(1)


SOURCES_SHOWN = 20  # sources listed by `reco info`, largest first


@app.command()
@cli_errors
def info(memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory", as_json: JsonOpt = False) -> None:
    """Count, sources, dimension, encoder, index status and migrations of a memory (never the API key)."""
    _must_exist(memory, collection)
    from ..backends import UnreadableCollection
    from ..doctor import collections_said, fullest_collection, unreadable_collections

    with _open(memory, collection, migrate=False, auto_index=False) as mem:
        data = mem.info()
        others = {n: c for n, c in mem.collections().items() if n != collection and c != 0}
    table = Table(title=f"memory {data['location']} / {data['collection']}", show_header=False)
    for k, v in data.items():
        if k == "sources":  # one row per source (the JSON has them all)
            for name, n in list(v.items())[:SOURCES_SHOWN]:
                table.add_row("source", f"{name}: {n:,} points")
            if len(v) > SOURCES_SHOWN:
                table.add_row("source", f"... {len(v) - SOURCES_SHOWN:,} more (see --json)")
            if not v:
                table.add_row("sources", "none (nothing ingested)")
        else:
            table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    _emit(data, as_json, table)
    readable = {n: c for n, c in others.items() if not isinstance(c, UnreadableCollection)}
    if readable and not as_json:
        err.print(f"[yellow]note:[/] other collections here: {collections_said(readable)}; select one with "
                  f"--collection {fullest_collection(readable)}", highlight=False)
    for f in [] if as_json else unreadable_collections(data["location"], others):
        err.print(f"[yellow]note:[/] {f.what}; {f.fix}", highlight=False)


@app.command()
@cli_errors
def search(text: Annotated[str | None, typer.Option(help="a text query")] = None,
           image: Annotated[Path | None, typer.Option(help="an image query")] = None,
           memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
           k: Annotated[int, typer.Option(help="neighbours to show")] = 10,
           cross: Annotated[bool, typer.Option(help="search the other modality's vectors")] = False,
           model: ModelOpt = None, pretrained: PretrainedOpt = None,
           encoder_kind: KindOpt = "open_clip", as_json: JsonOpt = False) -> None:
    """Neighbours of a text or image query, with captions and scores."""
    if (text is None) == (image is None):
        raise ValueError("give exactly one of --text or --image")
    _must_exist(memory, collection)  # before any encoder is loaded
    enc = _encoder(model, pretrained, encoder_kind, memory, collection)
    q, modality = (enc.encode_texts([text]), "text") if text is not None else (enc.encode_images([image]), "image")
    searched = modality if not cross else ("image" if modality == "text" else "text")
    with _open(memory, collection, encoder=enc) as mem:
        nb = mem.search(q, searched, k, None)
    hits = [{"rank": i + 1, "id": nb.ids[0, i], "score": float(nb.scores[0, i]), "caption": nb.captions[0][i],
             "uri": nb.payloads[0][i].get("uri")} for i in range(k) if nb.mask[0, i]]
    table = Table("rank", "score", "caption", "uri", title=f"{modality} query -> memory {searched} vectors")
    for h in hits:
        table.add_row(str(h["rank"]), f"{h['score']:.3f}", h["caption"], str(h["uri"] or ""))
    _emit(hits, as_json, table)


@app.command()
@cli_errors
def copy(src: Annotated[str, typer.Argument(help="memory to copy from (directory | URL)")],
         dst: Annotated[str, typer.Argument(help="memory to copy into (directory | URL)")],
         collection: CollectionOpt = "reco_memory",
         dst_collection: Annotated[str | None, typer.Option(help="collection at DST (default: same)")] = None,
         progress: ProgressOpt = True, as_json: JsonOpt = False) -> None:
    """Copy a memory (embedded -> server, server -> embedded), ids and payloads preserved. Idempotent."""
    from ..ingest import copy_memory

    with _open(src, collection, auto_index=False) as a, _open(dst, dst_collection or collection) as b:
        n = copy_memory(a, b, progress=progress and not as_json)
        res = {"copied": n, "src": src, "dst": dst, "dst_count": b.count()}
    if as_json:
        _emit(res, True)
    else:
        out.print(f"copied {n:,} points to {dst} (it now holds {res['dst_count']:,})")


def _parts(root: Path, collection: str) -> dict[str, int]:
    """The directories an embedded memory's collection consists of (collection, ledger, vector copy): bytes each."""
    return {p: sum(f.stat().st_size for f in (root / p).rglob("*") if f.is_file())
            for p in (collection, f"{collection}__meta", f"{collection}__vectors") if (root / p).is_dir()}


def _said_parts(parts: dict[str, int]) -> str:
    return ", ".join(f"{p}/ ({b / 2**20:,.1f} MiB)" for p, b in parts.items())


def _snapshot_config(memory: str | None, refusal: str, directory: str) -> Any:
    """The memory's config for `reco backup` / `reco restore`; :memory: has nothing to copy and no snapshots."""
    from ..config import MemoryConfig

    cfg = MemoryConfig(location=memory) if memory else MemoryConfig()
    if cfg.kind == "local":
        e = ValueError(f"memory :memory: lives in one process only, and qdrant-client's local mode has no snapshots: "
                       f"{refusal}")
        e.hint = f"--memory takes {directory} or a server URL (Qdrant snapshots)"
        raise e
    return cfg


@app.command()
@cli_errors
def backup(dest: Annotated[Path, typer.Argument(help="a new directory for the copy (a server memory: for the "
                                                     "manifest of its snapshots, which stay on the server)")],
           memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory", as_json: JsonOpt = False) -> None:
    """Copy a memory consistently while it stays open for reading: an embedded one into DEST; a server one as
    Qdrant snapshots (collection and ledger) taken on the server. `reco restore` brings it back and verifies it."""
    from ..memory import SNAPSHOT_MANIFEST

    cfg = _snapshot_config(memory, "nothing to back up", "a directory (copied)")
    if dest.exists():
        e = FileExistsError(f"backup destination {dest}: already exists; a backup is never written over one")
        e.hint = f"name a new directory (or move {dest} away first)"
        raise e
    _must_exist(memory, collection)  # never create a memory just to back it up
    with _open(memory, collection, migrate=False, auto_index=False) as mem:
        n = mem.backup(dest)
        location = mem.cfg.location
    if cfg.kind == "edge":
        parts = _parts(dest, collection)
        res = {"points": n, "memory": location, "collection": collection, "dest": str(dest), "copied": parts}
        said = (f"backed up memory {location} / {collection} into {dest}: {n:,} points (the count its ledger "
                f"acknowledges, checked by `reco restore`)\ncopied: {_said_parts(parts)}\n"
                f"restore: reco restore {dest} --memory NEW_DIR --collection {collection}")
    else:
        manifest = json.loads((dest / SNAPSHOT_MANIFEST).read_text())
        res = {**manifest, "dest": str(dest)}
        lines = [f"snapshot {name} of {c} (download: curl -H \"api-key: $RECO_API_KEY\" -o {name} "
                 f"{manifest['urls'][c]})" for c, name in manifest["snapshots"].items()]
        said = (f"backed up server memory {location} / {collection}: {n:,} points, as Qdrant snapshots kept on the "
                f"server (its snapshots directory); their manifest: {dest / SNAPSHOT_MANIFEST}\n" + "\n".join(lines) +
                f"\nrestore (the server recovers them with recover_snapshot, then the count is verified): reco restore "
                f"{dest} --memory URL --collection NAME")
    if as_json:
        _emit(res, True)
    else:
        out.print(said, highlight=False)


@app.command()
@cli_errors
def restore(backup: Annotated[str, typer.Argument(
                help="a directory `reco backup` wrote; for a server memory also a snapshot location: an http(s):// "
                     "URL or a file:// path on the server")],
            memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
            ledger_snapshot: Annotated[str | None, typer.Option(
                help="server, with a snapshot location as BACKUP: the snapshot of COLLECTION__meta (encoder record "
                     "and ledger; without it they start empty)")] = None,
            as_json: JsonOpt = False) -> None:
    """Bring a backup back into a memory that does not hold the collection yet, and verify the count."""
    from ..memory import Memory

    cfg = _snapshot_config(memory, "nothing to restore into", "a directory (an embedded backup)")
    if cfg.kind == "edge":
        src = Path(backup)
        if not src.is_dir():
            e = FileNotFoundError(f"backup {src}: no such directory")
            e.hint = "name a directory `reco backup DEST` wrote (for a server memory, --memory takes its URL)"
            raise e
        if ledger_snapshot is not None:
            raise ValueError("--ledger-snapshot is for a server memory (--memory http(s)://...); an embedded backup "
                             "directory holds its ledger")
        parts = _parts(src, collection)
        with _hint_on(FileExistsError, f"restore into another directory (--memory NEW_DIR), or move the collection "
                                       f"{collection!r} at {cfg.location} away first"), \
                _hint_on(FileNotFoundError, "the backup holds other collections? `ls` it and pass --collection"):
            done = Memory.restore(src, cfg.location, collection)
    else:
        parts = {}
        with _hint_on(FileExistsError, "restore into another --collection, or delete that collection first"):
            done = Memory.restore(backup, cfg.location, collection, ledger_snapshot=ledger_snapshot)
    n = done.points
    res = {"points": n, "verified": done.verified, "backup": backup, "memory": cfg.location,
           "collection": collection, "copied": parts, **({"not_verified": done.why} if not done.verified else {})}
    if as_json:
        _emit(res, True)
    else:
        what = f"copied: {_said_parts(parts)}\n" if parts else ""
        said = (f"verified: {n:,} points (the engine's count equals the count the backup acknowledged)"
                if done.verified else
                f"{n:,} points, not verified (the backup records no exact count): {done.why}")
        out.print(f"restored {backup} into memory {cfg.location} / {collection}\n{what}{said}", highlight=False)


@app.command()
@cli_errors
def dedup(eval_set: Annotated[Path, typer.Argument(
              help="evaluation images: an image folder (encoded with --model) or embeddings (img_emb/*.npy)")],
          memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
          threshold: Annotated[float, typer.Option(help="cosine similarity counted as a near-duplicate")] = 0.95,
          dry_run: Annotated[bool, typer.Option(help="only count, remove nothing")] = False,
          model: ModelOpt = None, pretrained: PretrainedOpt = None,
          encoder_kind: KindOpt = "open_clip", as_json: JsonOpt = False) -> None:
    """Remove from the memory the near-duplicates of an evaluation set's images (do it before evaluating)."""
    enc = None
    if (eval_set / "img_emb").is_dir():
        queries = _load_shards(eval_set, None, None)[0]
    else:
        from ..evaluation import image_files

        enc = _encoder(model, pretrained, encoder_kind, memory, collection)
        queries = enc.encode_images(image_files(eval_set), progress=not as_json)
    with _open(memory, collection, encoder=enc) as mem:
        ids = mem.near_duplicates(queries, threshold)
        if not dry_run:
            mem.delete(ids)
        res = {"eval_images": len(queries), "near_duplicates": len(ids), "removed": 0 if dry_run else len(ids),
               "threshold": threshold, "memory_count": mem.count()}
    if as_json:
        _emit(res, True)
    else:
        out.print(f"{len(ids):,} near-duplicates (cosine >= {threshold}) of {len(queries):,} evaluation images "
                  f"{'found (dry run)' if dry_run else 'removed'}; memory holds {res['memory_count']:,} points")
