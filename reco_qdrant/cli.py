"""The `reco` command: a thin layer that parses options and calls the Python API.

Workflow: `reco migrate` -> `reco ingest ...` -> `reco dedup` (evaluation images) -> `reco train` ->
`reco predict` / `reco eval ...`. `reco info` and `reco search` inspect a memory, `reco copy` moves one
between embedded and server, `reco backup` / `reco restore` keep a copy; `reco demo` runs everything on a
synthetic world.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False)
ingest_app = typer.Typer(help="Put image-text pairs into a memory (idempotent, resumable).", no_args_is_help=True)
eval_app = typer.Typer(help="Zero-shot accuracy and retrieval recall, baseline vs RECO.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(eval_app, name="eval")
out = Console()
err = Console(stderr=True)
_state: dict[str, Any] = {"debug": False, "command": None}

MemoryOpt = Annotated[str | None, typer.Option("--memory", "-m", help="directory | :memory: | http(s)://host[:port]; "
                                               "default $RECO_MEMORY or ./reco-data")]
CollectionOpt = Annotated[str, typer.Option(help="collection (one memory per collection)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="open_clip model name, or a sentence-transformers model "
                                              "(default: the encoder the memory records, else ViT-B-32)")]
PretrainedOpt = Annotated[str | None, typer.Option("--pretrained", help="open_clip tag or local checkpoint file; "
                                                   "'none' = random (default with --model: laion2b_s34b_b79k)")]
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-32", "laion2b_s34b_b79k"
KindOpt = Annotated[str, typer.Option("--encoder-kind", help="open_clip | sentence-transformers")]
WeightsOpt = Annotated[str, typer.Option(help="zero-shot: the fusion's weights for classes it never saw; adapted: "
                                               "the weights a `reco train --adapt` run fitted to its own classes")]
GateOpt = Annotated[str, typer.Option(help="none: RECO's scores alone; coverage: fall back, per image, to the plain "
                                            "encoder where the memory seems to lack the image's concept (useful "
                                            "when the memory may miss classes whose names the encoder knows)")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")]


def _hint(e: Exception) -> str:
    """The option or command that fixes `e` where one does; `--debug` only for errors our code did not foresee."""
    from .encoders import WeightsUnavailableError
    from .memory import EncoderMismatchError, MemoryDamagedError, MemoryInUseError, MemoryUnavailableError
    from .sources import MissingColumnError

    given = getattr(e, "hint", None)
    if given:
        return given
    if isinstance(e, WeightsUnavailableError):
        return ("three ways forward:\n"
                f"  1. a local checkpoint file: --pretrained /path/to/{e.filename}\n"
                f"     from {e.where}\n"
                "  2. a cache directory that holds them: HF_HOME=/path/to/dir (the hub cache\n"
                "     is DIR/hub; fill it where the network is reachable)\n"
                "  3. random weights, a dry run of the flow: --pretrained none")
    if isinstance(e, MissingColumnError):
        return f"name the table's {e.role} column with --{e.role}-column (its columns: {', '.join(e.columns)})"
    if isinstance(e, MemoryDamagedError):
        return "`reco doctor --memory PATH` checks the memory and says how to recover"
    if isinstance(e, MemoryInUseError):
        return "close the other process, or serve the memory with Qdrant (docker compose up qdrant)"
    if isinstance(e, MemoryUnavailableError):
        return "is the server up? `docker compose up -d qdrant`, and check --memory and RECO_API_KEY"
    if isinstance(e, EncoderMismatchError):
        return "use the encoder the memory was built with (see `reco info`), or another --memory/--collection"
    if _raised_by_us(e):
        return f"`{_command_path()} --help` lists its options"
    return "an unexpected error: run with --debug for the full traceback"


def _raised_by_us(e: BaseException) -> bool:
    """Whether `e` was raised by reco_qdrant's own code (an error it foresaw, whose message says what is wrong)."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).parent)


def _command_path() -> str:
    """`reco` and the names of the command running now, as typed (`reco ingest images`); `reco` outside one.

    The command is the one cli_errors recorded when it started: click's current context is not at hand here
    (typer may run on its own copy of click), and the program's name may be a test's."""
    running = _state.get("command")

    def find(group: typer.Typer, path: list[str]) -> list[str] | None:
        for info in group.registered_commands:
            if running is not None and info.callback is running:
                return [*path, info.name or info.callback.__name__.lower().replace("_", "-")]
        for g in group.registered_groups:
            sub = find(g.typer_instance, [*path, g.name or ""]) if g.typer_instance is not None else None
            if sub:
                return sub
        return None

    return " ".join(find(app, ["reco"]) or ["reco"])


@contextlib.contextmanager
def _hint_on(kinds: type[BaseException] | tuple[type[BaseException], ...], hint: str) -> Iterator[None]:
    """Errors of `kinds` raised inside get `hint` (the command or option that fixes them here)."""
    try:
        yield
    except kinds as e:
        if not getattr(e, "hint", None):
            e.hint = hint  # type: ignore[attr-defined]
        raise


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One readable error line plus a hint, exit code 1; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        running, _state["command"] = _state.get("command"), wrapper  # the command the hints name
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {getattr(e, 'headline', e)}", markup=True, highlight=False,
                      soft_wrap=True)
            err.print(f"[dim]hint: {_hint(e)}[/]", highlight=False)
            raise typer.Exit(1) from None
        finally:
            _state["command"] = running

    return wrapper


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A warning as one wrapped line, like an error (where it came from only with --debug)."""
    where = f" ({category.__name__}, {filename}:{lineno})" if _state["debug"] else ""
    err.print(f"[yellow]warning:[/] {escape(str(message))}{where}", highlight=False)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug
    warnings.showwarning = _show_warning


def _open(memory: str | None, collection: str, **kw: Any) -> Any:
    from .memory import Memory

    return Memory.open(memory, collection=collection, **kw)


def _must_exist(memory: str | None, collection: str) -> None:
    """Read-only commands never create a memory: an embedded one must already be a directory holding `collection`."""
    from .backends import count_edge_collection, edge_collections
    from .config import MemoryConfig
    from .doctor import collections_said, fullest_collection

    cfg = MemoryConfig(location=memory) if memory else MemoryConfig()
    if cfg.kind != "edge":
        return
    if not Path(cfg.location).exists():
        e = FileNotFoundError(f"memory {cfg.location}: no such directory, so no memory there (check --memory or "
                              "$RECO_MEMORY; `reco ingest ...` or `reco migrate` creates one)")
        e.hint = (f"`reco ingest images FOLDER --captions TABLE --memory {cfg.location}` (or `reco ingest embeddings "
                  "FOLDER`) creates a memory there; --memory names another")
        raise e
    names = edge_collections(cfg.location)
    if collection not in names:
        held = {n: count_edge_collection(cfg.location, n) for n in names}
        e = FileNotFoundError(f"memory {cfg.location} has no collection {collection!r}" + (
            f"; it holds {collections_said(held)}" if held else " (nothing was ingested there)"))
        e.hint = (f"select one with --collection {fullest_collection(held)}" if held else
                  f"`reco ingest images FOLDER --captions TABLE --memory {cfg.location}` fills it")
        raise e


def _encoder(model: str | None, pretrained: str | None, kind: str, memory: str | None, collection: str) -> Any:
    """The encoder a command uses: the one named by --model/--pretrained; else the one the memory records
    (said in one line); else, for a new memory, ViT-B-32 / laion2b_s34b_b79k."""
    from .backends import edge_collections
    from .config import MemoryConfig
    from .encoders import encoder_from_record, load_encoder

    if model is None and pretrained is None:
        cfg = MemoryConfig(location=memory) if memory else MemoryConfig()
        rec = None
        if cfg.kind != "edge" or collection in edge_collections(cfg.location):  # never create one just to look
            with _open(memory, collection, migrate=False, auto_index=False) as mem:
                rec = mem.encoder_record
        if rec is not None:
            enc = encoder_from_record(rec)
            err.print(f"encoder: {rec['id']} (recorded with the memory)", highlight=False)
            return enc
    pretrained = DEFAULT_PRETRAINED if pretrained is None else pretrained
    with _hint_on((FileNotFoundError, ValueError), "--pretrained takes an open_clip tag of --model, a checkpoint file "
                                                   "that exists, or none (random weights)"):
        return load_encoder(model or DEFAULT_MODEL, None if pretrained == "none" else pretrained, kind=kind)


def _emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    elif table is not None:
        out.print(table)
    else:
        out.print(data)


# --------------------------------------------------------------------------- memory


@app.command()
@cli_errors
def migrate(memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
            dim: Annotated[int | None, typer.Option(help="embedding dimension (needed for a new memory)")] = None,
            encoder_id: Annotated[str | None, typer.Option(help="record this encoder id with the memory")] = None,
            quantization: Annotated[str | None, typer.Option(
                help="int8 (default: int8 in RAM, searched with rescoring) | none (float vectors only)")] = None,
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
                progress: bool, restart: bool, as_json: bool) -> None:
    from .ingest import ingest

    with _open(memory, collection, encoder=encoder) as mem:
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
RestartOpt = Annotated[bool, typer.Option(
    help="ignore the resume ledger: re-encode and re-store every batch (an ingest otherwise skips the batches an "
         "earlier run of the same files finished)")]
FileColumnOpt = Annotated[str, typer.Option(help="the captions table's column of image file names (relative to "
                                                 "FOLDER)")]
CaptionColumnOpt = Annotated[str, typer.Option(help="the table's column of captions")]
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
                      progress: ProgressOpt = True, restart: RestartOpt = False, as_json: JsonOpt = False) -> None:
    """Precomputed embeddings in the clip-retrieval / LAION layout (.npy + parquet)."""
    from .sources import EmbeddingShards

    layout = (path / "img_emb").is_dir()  # without it, the folder may be one of images
    with contextlib.nullcontext() if layout else _hint_on(FileNotFoundError, IMAGES_LAYOUT_HINT):
        src = EmbeddingShards(path, caption_column, key_column, source, batch_size, duplicates)
    _run_ingest(memory, collection, src, None, encoder_id, progress, restart, as_json)


@ingest_app.command("auto")
@cli_errors
def ingest_auto(path: Annotated[Path, typer.Argument(
                    help="a folder in either layout: img_emb/ text_emb/ metadata/, or images + captions.csv|parquet")],
                memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory", source: SourceOpt = None,
                model: ModelOpt = None, pretrained: PretrainedOpt = None, encoder_kind: KindOpt = "open_clip",
                encoder_id: Annotated[str | None, typer.Option(
                    help="embeddings: id of the encoder that made them")] = None,
                progress: ProgressOpt = True, restart: RestartOpt = False, as_json: JsonOpt = False) -> None:
    """A data folder whose layout is found by looking at it (what the compose `ingest` service runs)."""
    from .sources import EmbeddingShards, open_folder

    with _hint_on(FileNotFoundError, "give a folder in one of the two layouts (`reco ingest images FOLDER --captions "
                                     "TABLE` reads a table kept elsewhere)"):
        src = open_folder(path, source)
    enc = None if isinstance(src, EmbeddingShards) else _encoder(model, pretrained, encoder_kind, memory, collection)
    _run_ingest(memory, collection, src, enc, encoder_id if enc is None else None, progress, restart, as_json)


@ingest_app.command("images")
@cli_errors
def ingest_images(folder: Annotated[Path, typer.Argument(help="the image folder (file names in the table are "
                                                               "relative to it)")],
                  captions: Annotated[Path, typer.Option(help="table: file -> caption (.csv, .tsv, .parquet or "
                                                              ".jsonl)")],
                  memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                  file_column: FileColumnOpt = "file", caption_column: CaptionColumnOpt = "caption",
                  source: SourceOpt = None, model: ModelOpt = None, pretrained: PretrainedOpt = None,
                  encoder_kind: KindOpt = "open_clip", batch_size: ImageBatchOpt = 64, progress: ProgressOpt = True,
                  restart: RestartOpt = False, as_json: JsonOpt = False) -> None:
    """An image folder plus a captions table (parquet/csv/jsonl), encoded with the given model."""
    from .sources import ImageFolder

    with _hint_on(FileNotFoundError, "check FOLDER and --captions (file names in the table are relative to "
                                     "FOLDER; --file-column names their column)"):
        src = ImageFolder(folder, captions, file_column, caption_column, source, batch_size)
    enc = _encoder(model, pretrained, encoder_kind, memory, collection)
    with _hint_on(FileNotFoundError, "file names in the table are relative to FOLDER: check FOLDER and "
                                     "--file-column"):
        _run_ingest(memory, collection, src, enc, None, progress, restart, as_json)


@ingest_app.command("webdataset")
@cli_errors
def ingest_webdataset(shards: Annotated[list[Path], typer.Argument(help=".tar shards")],
                      memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                      source: SourceOpt = None, model: ModelOpt = None,
                      pretrained: PretrainedOpt = None, encoder_kind: KindOpt = "open_clip",
                      batch_size: ImageBatchOpt = 64, progress: ProgressOpt = True, restart: RestartOpt = False,
                      as_json: JsonOpt = False) -> None:
    """WebDataset tar shards (KEY.jpg + KEY.txt), read in memory and encoded with the given model."""
    from .sources import WebDataset

    src = WebDataset(shards, source, batch_size)
    enc = _encoder(model, pretrained, encoder_kind, memory, collection)
    _run_ingest(memory, collection, src, enc, None, progress, restart, as_json)


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
    from .doctor import check_memory

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
    from .backends import UnreadableCollection
    from .doctor import collections_said, fullest_collection, unreadable_collections

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
    from .ingest import copy_memory

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
    from .config import MemoryConfig

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
    from .memory import SNAPSHOT_MANIFEST

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
    from .memory import Memory

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
        from .evaluation import image_files

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


# --------------------------------------------------------------------------- method


def _load_shards(path: Path, label_column: str | None, key_column: str | None) -> tuple:
    from .sources import EmbeddingShards

    src = EmbeddingShards(path, key_column=key_column)
    img, txt, keys, labels = [], [], [], []
    for b in src.batches():
        img.append(b.image_embeddings)
        txt.append(b.text_embeddings)
        keys += b.keys
        if label_column:
            if label_column not in (b.payloads[0] if b.payloads else {}):
                raise ValueError(f"{b.origin}: metadata has no column {label_column!r}")
            labels += [str(p[label_column]) for p in b.payloads]
    names = sorted(set(labels))
    lab = np.searchsorted(names, labels) if label_column else None
    return np.concatenate(img), np.concatenate(txt), keys, lab, names, src.name


@dataclass
class _Pairs:
    """Training pairs read from PAIRS, with what names them in the memory."""

    image: np.ndarray  # [N, d]
    text: np.ndarray  # [N, d]
    keys: list[str]  # with a source name, the point ids the pairs have if they were ingested
    labels: np.ndarray | None  # [N] class index, with --label-column
    names: list[str]  # class names, by index
    source_names: list[str]  # the names an ingest of PAIRS would have given the source (default, legacy)


def _labels_of(values: list[Any], column: str, origin: str) -> tuple[np.ndarray, list[str]]:
    if any(v is None for v in values):
        raise ValueError(f"{origin}: column {column!r} has empty values; every training pair needs a class")
    names = sorted({str(v) for v in values})
    return np.searchsorted(names, [str(v) for v in values]), names


def _training_pairs(pairs: Path, captions: Path | None, file_column: str, caption_column: str,
                    label_column: str | None, key_column: str | None, enc: Any, progress: bool) -> _Pairs:
    """PAIRS as embeddings: a clip-retrieval folder as stored, an image folder (+ captions table) encoded with
    `enc` (the memory's encoder) and cached, so that a second run does not encode again."""
    from .ingest import encode_pairs
    from .sources import ImageFolder, MissingColumnError, open_folder

    if captions is None and (pairs / "img_emb").is_dir():
        img, txt, keys, labels, names, name = _load_shards(pairs, label_column, key_column)
        return _Pairs(img, txt, keys, labels, names, [name, pairs.resolve().name])
    if key_column:
        raise ValueError("--key-column names the metadata column of an embeddings folder; an image folder's keys are "
                         "its file names (--file-column)")
    with _hint_on(FileNotFoundError, "PAIRS: an embeddings folder (img_emb/ text_emb/ metadata/), or an image "
                                     "folder with --captions TABLE"):
        src = (ImageFolder(pairs, captions, file_column, caption_column) if captions is not None
               else open_folder(pairs))  # no img_emb/ there: images with their own captions table, or an error
    if label_column and label_column not in src.table.columns:
        raise MissingColumnError(str(src.table_path), label_column, src.table.columns, "label")
    with _hint_on(FileNotFoundError, "file names in the table are relative to PAIRS: check --file-column"):
        enc_pairs = encode_pairs(src, enc, progress=progress)
    n = len(enc_pairs.keys)
    err.print(f"{n:,} training pairs from {pairs}: " + (
        f"embeddings read from the cache ({enc_pairs.cache_path})" if enc_pairs.from_cache else
        f"encoded with {enc.id}, cached in {enc_pairs.cache_path}"), highlight=False)
    labels, names = None, []
    if label_column:
        labels, names = _labels_of([p.get(label_column) for p in enc_pairs.payloads], label_column,
                                   str(src.table_path))
    return _Pairs(enc_pairs.image_embeddings, enc_pairs.text_embeddings, enc_pairs.keys, labels, names,
                  [src.name, src.legacy_name or src.name])


SAME_PAIR_COSINE = 0.99  # a stored image vector this close to a training pair's is that pair's point


def _in_memory(mem: Any, keys: list[str], image: np.ndarray, given: str | None,
               defaults: list[str]) -> tuple[str | None, list[str], tuple[str, int] | None]:
    """The source under which these pairs were ingested into `mem` (`given`, else found: the source names an ingest
    of PAIRS gives by default, then the memory's own sources), the ids of the pairs stored under it, and where
    their keys were found with other pictures ((source, how many), or None).

    A pair is stored under a source when a point has its key there and that point's image vector is the pair's
    (`image`, cosine > 0.99): keys alone are file names, and another folder with the same names holds other
    pictures. A sample of 200 keys picks the source at once when the pairs are mostly stored; when it finds none,
    every key is looked up under each of the first 10 candidates (a few stored pairs among many new ones)."""
    from .memory import point_id

    unit = np.asarray(image, np.float32)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    namesakes: dict[str, int] = {}  # source -> keys found there with another image vector

    def stored(source: str, rows: Sequence[int]) -> list[str]:
        if not mem.backend.has_collection():
            return []
        ids = [point_id(source, keys[i]) for i in rows]
        row_of = dict(zip(ids, rows, strict=True))
        same: set[str] = set()
        other = 0
        for s in range(0, len(ids), 1000):
            for r in mem.retrieve(ids[s : s + 1000], with_vectors=True):
                v = np.asarray(r.vectors["image"], np.float32)
                u = unit[row_of[r.id]]
                if v.shape == u.shape and float(u @ v) > SAME_PAIR_COSINE * max(float(np.linalg.norm(v)), 1e-12):
                    same.add(r.id)
                else:
                    other += 1
        namesakes[source] = max(namesakes.get(source, 0), other)
        return [i for i in ids if i in same]

    def namesake() -> tuple[str, int] | None:
        most = max(namesakes, key=lambda c: namesakes[c], default=None)
        return (most, namesakes[most]) if most is not None and namesakes[most] else None

    every = range(len(keys))
    candidates = [given] if given else list(dict.fromkeys([*defaults, *list(mem.sources())[:50]]))
    probe = np.unique(np.linspace(0, len(keys) - 1, min(len(keys), 200)).astype(int)).tolist()
    hits = {c: len(stored(c, probe)) for c in candidates}
    best = max(candidates, key=lambda c: hits[c]) if candidates else None
    if best is not None and hits[best]:
        return best, stored(best, every), None
    for c in candidates[:10]:
        found = stored(c, every)
        if found:
            return c, found, None
    if given:
        other = namesakes.get(given, 0)
        raise ValueError(f"none of the training pairs is in the memory under source {given!r}" + (
            f" ({other:,} of their keys are there, with other images: other pairs)" if other else "") +
            f"; its sources: {', '.join(mem.sources()) or 'none'} (--in-memory-source names one, or leave it out "
            "to have it found)")
    return None, [], namesake()


@app.command()
@cli_errors
def train(pairs: Annotated[Path | None, typer.Argument(
              help="training pairs: an image folder (with --captions TABLE, or its own captions.csv|parquet), "
                   "encoded with the memory's encoder and cached; or a clip-retrieval embeddings folder "
                   "(default: a sample of the memory's own pairs)")] = None,
          captions: Annotated[Path | None, typer.Option(
              help="PAIRS is an image folder: its captions table (what `reco ingest images` takes)")] = None,
          file_column: FileColumnOpt = "file", caption_column: CaptionColumnOpt = "caption",
          out_dir: Annotated[Path, typer.Option("--out", help="checkpoints: OUT/best, OUT/last (resumable)")] = Path(
              "reco-runs/fusion"),
          memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
          sample: Annotated[int, typer.Option(
              help="without PAIRS: how many of the memory's pairs to train on (unlabelled, as RECO does)")] = 100_000,
          label_column: Annotated[str | None, typer.Option(help="class column (validates on held-out classes)")] = None,
          adapt: Annotated[bool, typer.Option(
              help="also fit weights to the classes of --label-column, with their prompts (--templates): use "
                   "them with `reco predict --weights adapted` on those classes, with the same templates")] = False,
          templates: Annotated[str, typer.Option(help="--adapt: the prompts' templates")] = "generic",
          model_name: ModelOpt = None, pretrained: PretrainedOpt = None, encoder_kind: KindOpt = "open_clip",
          key_column: Annotated[str | None, typer.Option(help="key column of an embeddings folder's metadata")] = None,
          in_memory_source: Annotated[str | None, typer.Option(
              help="source name under which PAIRS were ingested (each pair's own point is left out of its "
                   "neighbours); found by the pairs' keys when left out")] = None,
          k: Annotated[int, typer.Option(help="neighbours retrieved per query")] = 10,
          epochs: Annotated[int, typer.Option(help="most epochs (the best one by validation is kept)")] = 30,
          batch_size: Annotated[int, typer.Option(help="pairs per training step")] = 128,
          lr: Annotated[float | None, typer.Option(
              help="default: the aggregator's (relevance 2e-3, transformer 3e-4)")] = None,
          seed: Annotated[int, typer.Option(help="seed of the initialisation, shuffling and validation split")] = 0,
          search: Annotated[str, typer.Option(help="uni (search the query's modality) | cross")] = "uni",
          fusion: Annotated[str, typer.Option(help="cross (fuse the neighbours' other modality) | uni")] = "cross",
          aggregator: Annotated[str, typer.Option(help="relevance | transformer (the paper's) | mean")] = "relevance",
          device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda when present)")] = None,
          precision: Annotated[str, typer.Option(help="auto | bf16 | fp32 (auto: bf16 if the chip has it)")] = "auto",
          restart: Annotated[bool, typer.Option(
              help="OUT holds a run on other data or settings: train afresh there (else it is refused)")] = False,
          progress: ProgressOpt = True, as_json: JsonOpt = False) -> None:
    """Train the fusion model (encoders frozen) on unlabelled image-text pairs: PAIRS, or by default a sample of
    the memory's own pairs. Early-stopped on held-out pseudo-classes (or held-out classes with --label-column).

    Pairs that are in the memory (found by their keys) are left out of their own neighbours. Re-running with the
    same data and settings resumes (or returns the finished run); with others it is refused unless --restart."""
    from .memory import point_id
    from .training import train_fusion

    if adapt and not label_column:
        raise ValueError("--adapt fits weights to labelled classes: give PAIRS with --label-column")
    if pairs is None and (label_column or in_memory_source or key_column or captions):
        raise ValueError("--label-column, --in-memory-source, --key-column and --captions describe PAIRS; give it")
    if pairs is not None and sample != 100_000:
        raise ValueError("--sample draws pairs from the memory: leave it out when PAIRS is given")
    images = pairs is not None and (captions is not None or not (pairs / "img_emb").is_dir())
    _must_exist(memory, collection)  # training retrieves from the memory (its encoder encodes images): create none
    # the encoder is resolved before the memory is opened for training (an embedded memory opens once)
    enc = _encoder(model_name, pretrained, encoder_kind, memory, collection) if images or adapt else None
    data = None if pairs is None else _training_pairs(pairs, captions, file_column, caption_column, label_column,
                                                      key_column, enc, progress and not as_json)
    with _open(memory, collection, encoder=enc) as mem:
        class_embeddings, labels, ids = None, None, None
        if data is None:
            ids, img, txt = mem.sample_pairs(sample, seed, progress=progress and not as_json)
            err.print(f"training on {len(ids):,} of the memory's {mem.count():,} pairs (unlabelled; each pair's own "
                      "point is left out of its neighbours)", highlight=False)
        else:
            img, txt, labels = data.image, data.text, data.labels
            source, found, namesake = _in_memory(mem, data.keys, data.image, in_memory_source, data.source_names)
            n = len(data.keys)
            if found:
                how = "" if in_memory_source else ", found by their keys"
                err.print(f"{len(found):,} of the {n:,} training pairs are in the memory (source {source}{how}): "
                          "each is left out of its own neighbours", highlight=False)
                stored = set(found)  # key and image match: a key stored with another image is another pair,
                # whose point is not to be left out; those pairs get an id no point has (train_fusion wants one each)
                ids = [pid if pid in stored else _unstored_id(source, kk)
                       for pid, kk in ((point_id(source, kk), kk) for kk in data.keys)]
                img, txt, labels, ids = _first_found(img, txt, labels, ids, set(found))
            else:
                err.print(f"0 of the {n:,} training pairs are in the memory: none to leave out of their own "
                          "neighbours" + (f" ({namesake[1]:,} of their keys are stored under source {namesake[0]}, "
                                          "with other images: other pairs)" if namesake else ""), highlight=False)
            if adapt:
                from .classifier import RecoClassifier

                clf = RecoClassifier(encoder=enc, use_retrieval=False).set_classes(data.names, templates)
                class_embeddings = clf.raw_class_embeddings_
        model = train_fusion(mem, img, txt, labels=labels, class_embeddings=class_embeddings, ids=ids, k=k,
                             epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, search=search, fusion=fusion,
                             aggregator=aggregator, device=device, precision=precision, out_dir=str(out_dir),
                             progress=progress, on_mismatch="restart" if restart else "error")
    from .training import _save

    _save(out_dir, "best", model)  # beside, fsync, rename: a crash here leaves training's best/ whole
    res = {"checkpoint": str(out_dir / "best"), "best_epoch": model.best_epoch, "history": model.history}
    if as_json:
        _emit(res, True)
    else:
        table = Table("epoch", "loss", "validation", "baseline", "s", title=f"training (best epoch {model.best_epoch})")
        for h in model.history:
            table.add_row(str(h["epoch"]), f"{h.get('loss', float('nan')):.4f}", f"{h['val']:.4f}",
                          f"{h['val_baseline']:.4f}", f"{h.get('seconds', 0):.1f}")
        out.print(table)
        out.print(f"saved {out_dir / 'best'}")


_UNSTORED_NAMESPACE = uuid.UUID("0b6f5e0c-3d0e-4f61-9a53-5d2b7c0e9a11")


def _unstored_id(source: str, key: str) -> str:
    """The id of a training pair that is not in the memory: a uuid5 in a namespace of its own, so no point (whose
    ids `point_id` derives in another namespace) has it, and leaving it out of the neighbours leaves nothing out."""
    return str(uuid.uuid5(_UNSTORED_NAMESPACE, f"{source}\x1f{key}"))


def _first_found(img: np.ndarray, txt: np.ndarray, labels: np.ndarray | None, ids: list[str],
                 found: set[str]) -> tuple:
    """train_fusion checks that its ids are the memory's on a sample of rows that starts with the first: put a pair
    that is in the memory first (one swap), so a few stored pairs among many new ones are still left out."""
    j = next(i for i, pid in enumerate(ids) if pid in found)
    if j == 0:
        return img, txt, labels, ids
    order = np.arange(len(ids))
    order[[0, j]] = order[[j, 0]]
    return img[order], txt[order], None if labels is None else labels[order], [ids[i] for i in order]


def _classes(classes: str) -> list[str]:
    p = Path(classes)
    if p.is_file():
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [c.strip() for c in classes.split(",") if c.strip()]


def _classifier(memory: str | None, collection: str, fusion_path: Path | None, model: str, pretrained: str | None,
                kind: str, retrieval: bool = True, weights: str = "zero-shot", gate: str = "none") -> tuple[Any, Any]:
    from .classifier import GATES, RecoClassifier
    from .fusion import FusionModel

    if weights != "zero-shot" and (fusion_path is None or not retrieval):
        raise ValueError(f"--weights {weights} selects a fusion model's weights: give --fusion")
    if gate not in GATES:
        raise ValueError(f"--gate must be one of {', '.join(GATES)}, got {gate!r}")
    if gate != "none" and (fusion_path is None or not retrieval):
        raise ValueError(f"--gate {gate} mixes RECO's scores with the encoder's: give --fusion")
    if retrieval and fusion_path is not None:
        _must_exist(memory, collection)  # RECO retrieves from it: before any encoder is loaded, creating nothing
    enc = _encoder(model, pretrained, kind, memory, collection)
    if not retrieval or fusion_path is None:
        return RecoClassifier(encoder=enc, use_retrieval=False), None
    mem = _open(memory, collection, encoder=enc)
    try:
        return RecoClassifier(mem, FusionModel.from_pretrained(fusion_path), encoder=enc, weights=weights,
                              gate=gate), mem
    except Exception:
        mem.close()
        raise


@app.command()
@cli_errors
def predict(images: Annotated[list[Path], typer.Argument(help="image files")],
            classes: Annotated[str, typer.Option(help="class names: a file (one per line) or a comma list")],
            fusion: Annotated[Path | None, typer.Option(help="fusion checkpoint dir (none = plain CLIP)")] = None,
            templates: Annotated[str, typer.Option(
                help="generic | birds | flowers | cars | dogs, or one template like 'a photo of a {}.'")] = "generic",
            memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory", model: ModelOpt = None,
            pretrained: PretrainedOpt = None, encoder_kind: KindOpt = "open_clip", weights: WeightsOpt = "zero-shot",
            gate: GateOpt = "none", as_json: JsonOpt = False) -> None:
    """Zero-shot classify images with RECO (or plain CLIP without --fusion)."""
    clf, mem = _classifier(memory, collection, fusion, model, pretrained, encoder_kind, weights=weights, gate=gate)
    try:
        clf.set_classes(_classes(classes), templates)
        proba = clf.predict_proba(images)
    finally:
        if mem is not None:
            mem.close()
    res = [{"image": str(p), "class": clf.classes_[int(i)], "probability": float(pr[i])}
           for p, pr, i in zip(images, proba, proba.argmax(1))]
    table = Table("image", "class", "p", title="RECO" if fusion else "plain CLIP")
    for r in res:
        table.add_row(r["image"], r["class"], f"{r['probability']:.3f}")
    _emit(res, as_json, table)


def _report_table(title: str, rows: list[tuple[str, dict]]) -> Table:
    keys = list(rows[0][1])
    table = Table("method", *keys, title=title)
    for name, r in rows:
        table.add_row(name, *[f"{100 * r[k]:.1f}" for k in keys])
    return table


@eval_app.command("zero-shot")
@cli_errors
def eval_zero_shot(folder: Annotated[Path, typer.Argument(help="ImageFolder: FOLDER/<class name>/<image>")],
                   fusion: Annotated[Path, typer.Option(help="fusion checkpoint dir")],
                   templates: Annotated[str, typer.Option(
                       help="generic | birds | flowers | cars | dogs, or one template like 'a photo of a {}.'")] = (
                       "generic"),
                   memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                   model: ModelOpt = None, pretrained: PretrainedOpt = None,
                   encoder_kind: KindOpt = "open_clip", weights: WeightsOpt = "zero-shot", gate: GateOpt = "none",
                   output: Annotated[Path | None, typer.Option("--output", help="write JSON here")] = None,
                   as_json: JsonOpt = False) -> None:
    """Zero-shot top-1/top-5, baseline and RECO side by side, same prompts."""
    from .evaluation import image_folder_dataset, zero_shot_report

    paths, labels, names = image_folder_dataset(folder)
    clf, mem = _classifier(memory, collection, fusion, model, pretrained, encoder_kind, weights=weights, gate=gate)
    try:
        clf.set_classes(names, templates)
        res = {**zero_shot_report(clf, clf.encoder.encode_images(paths, progress=not as_json), labels), "gate": gate}
    finally:
        mem.close()
    if output:
        output.write_text(json.dumps(res, indent=2))
    reco = "RECO" if gate == "none" else f"RECO, {gate} gate"
    _emit(res, as_json, _report_table(f"zero-shot on {folder} ({res['n_images']} images, {res['n_classes']} classes)",
                                      [("baseline", res["baseline"]), (reco, res["reco"])]))


@eval_app.command("retrieval")
@cli_errors
def eval_retrieval(pairs: Annotated[Path, typer.Argument(help="paired embeddings, clip-retrieval layout")],
                   fusion: Annotated[Path, typer.Option(help="fusion checkpoint dir")],
                   memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                   output: Annotated[Path | None, typer.Option("--output", help="write JSON here")] = None,
                   as_json: JsonOpt = False) -> None:
    """Image->text and text->image recall@1/5/10, baseline and RECO."""
    from .classifier import RecoClassifier
    from .evaluation import retrieval_report
    from .fusion import FusionModel

    img, txt, *_ = _load_shards(pairs, None, None)
    with _open(memory, collection) as mem:
        res = retrieval_report(RecoClassifier(mem, FusionModel.from_pretrained(fusion)), img, txt)
    if output:
        output.write_text(json.dumps(res, indent=2))
    rows = [(f"{m} {d}", res[m][d]) for m in ("baseline", "reco") for d in ("image_to_text", "text_to_image")]
    _emit(res, as_json, _report_table(f"retrieval on {res['n_pairs']} pairs", rows))


@app.command()
@cli_errors
def demo(memory: MemoryOpt = None,
         seed: Annotated[int, typer.Option(help="seed of the synthetic world and of training")] = 0,
         out_dir: Annotated[Path, typer.Option("--out", help="the demo's checkpoint dir")] = Path("reco-runs/demo"),
         ablations: Annotated[bool, typer.Option(help="also train the paper's ablations")] = True,
         export: Annotated[Path | None, typer.Option(
             help="write the demo world's data here (memory/, train/, eval.npz) instead of running it")] = None,
         progress: ProgressOpt = True, as_json: JsonOpt = False) -> None:
    """RECO end to end on a synthetic fine-grained world: memory, training, baseline vs RECO, ablations."""
    from .demo import export_demo, run_demo

    if export is not None:
        written = export_demo(export, seed=seed)
        if as_json:
            _emit(written, True)
        for what, where in ({} if as_json else written).items():
            out.print(f"{what}: {where}", highlight=False)
        return

    res = run_demo(memory, seed=seed, out_dir=out_dir, ablations=ablations, progress=progress and not as_json)
    if as_json:
        _emit(res, True)
        return
    m = res["memory"]
    out.print(f"memory: {m['location']} / {m['collection']}: {m['count']:,} image-text pairs "
              f"({m['dim']}-d, {m['index_backend']})")
    table = Table("method", "top-1", "top-5", "best epoch", "train s",
                  title="zero-shot on classes never seen in training, fusion trained without labels "
                  "(synthetic fine-grained world)")
    for r in res["table"]:
        table.add_row(r["method"], f"{100 * r['top1']:.1f}", f"{100 * r['top5']:.1f}", str(r["epoch"]),
                      f"{r['train_s']:.1f}")
    out.print(table)
    for e in res["examples"]:
        out.print(f"\n[bold]image of {e['truth']}[/]: baseline says {e['baseline']}, RECO says {e['reco']}; "
                  "its neighbours' captions:")
        for n in e["neighbours"]:
            out.print(f"  {n['score']:.3f}  {n['caption']}", highlight=False)
    out.print(f"\nfusion checkpoint: {res['checkpoint']}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
