"""What every `reco` command shares: the app, its consoles and options, one-line errors with hints, and the
few helpers that open a memory or an encoder."""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

APP_HELP = """The `reco` command: a thin layer that parses options and calls the Python API.

Workflow: `reco migrate` -> `reco ingest ...` -> `reco dedup` (evaluation images) -> `reco train` ->
`reco predict` / `reco eval ...`. `reco info` and `reco search` inspect a memory, `reco copy` moves one
between embedded and server, `reco backup` / `reco restore` keep a copy; `reco demo` runs everything on a
synthetic world.
"""
app = typer.Typer(help=APP_HELP, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False)
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
GateOpt = Annotated[str | None, typer.Option(help="coverage (the default with zero-shot weights): RECO's scores "
                                                   "with mean fusion's, plus, per image, the plain encoder's evidence "
                                                   "where the memory seems to lack the image's concept; none (the "
                                                   "default with --weights adapted): RECO's scores alone")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")]

FileColumnOpt = Annotated[str, typer.Option(help="the captions table's column of image file names (relative to "
                                                 "FOLDER)")]
CaptionColumnOpt = Annotated[str, typer.Option(help="the table's column of captions")]

def _hint(e: Exception) -> str:
    """The option or command that fixes `e` where one does; `--debug` only for errors our code did not foresee."""
    from ..encoders import WeightsUnavailableError
    from ..memory import EncoderMismatchError, MemoryDamagedError, MemoryInUseError, MemoryUnavailableError
    from ..sources import MissingColumnError

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
    package = Path(__file__).resolve().parent.parent  # reco_qdrant, cli/ included
    return last is not None and Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


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
    from ..memory import Memory

    return Memory.open(memory, collection=collection, **kw)


def _must_exist(memory: str | None, collection: str) -> None:
    """Read-only commands never create a memory: an embedded one must already be a directory holding `collection`."""
    from ..backends import count_edge_collection, edge_collections
    from ..config import MemoryConfig
    from ..doctor import collections_said, fullest_collection

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
    from ..backends import edge_collections
    from ..config import MemoryConfig
    from ..encoders import encoder_from_record, load_encoder

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



def _load_shards(path: Path, label_column: str | None, key_column: str | None) -> tuple:
    from ..sources import EmbeddingShards

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

def main() -> None:
    app()
