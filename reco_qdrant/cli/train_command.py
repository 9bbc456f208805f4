"""`reco train`: the training pairs (an embeddings folder, an image folder, or a sample of the memory's own pairs),
found in the memory by their keys, and the fusion trained on them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

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
    out,
)


@dataclass
class _Pairs:
    """Training pairs read from PAIRS, with what names them in the memory."""

    image: np.ndarray  # [N, d]
    text: np.ndarray  # [N, d]
    keys: list[str]  # with a source name, the point ids the pairs have if they were ingested
    labels: np.ndarray | None  # [N] class index, with --label-column
    names: list[str]  # class names, by index
    source_names: list[str]  # the names an ingest of PAIRS would have given the source (default, legacy)


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


def _labels_of(values: list[Any], column: str, origin: str) -> tuple[np.ndarray, list[str]]:
    if any(v is None for v in values):
        raise ValueError(f"{origin}: column {column!r} has empty values; every training pair needs a class")
    names = sorted({str(v) for v in values})
    return np.searchsorted(names, [str(v) for v in values]), names


def _training_pairs(pairs: Path, captions: Path | None, file_column: str, caption_column: str,
                    label_column: str | None, key_column: str | None, enc: Any, progress: bool) -> _Pairs:
    """PAIRS as embeddings: a clip-retrieval folder as stored, an image folder (+ captions table) encoded with
    `enc` (the memory's encoder) and cached, so that a second run does not encode again."""
    from ..ingest import encode_pairs
    from ..sources import ImageFolder, MissingColumnError, open_folder

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
    from ..memory import point_id

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
    from ..training import _save, train_fusion

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
        if data is None:
            ids, img, txt = mem.sample_pairs(sample, seed, progress=progress and not as_json)
            labels = class_embeddings = None
            err.print(f"training on {len(ids):,} of the memory's {mem.count():,} pairs (unlabelled; each pair's own "
                      "point is left out of its neighbours)", highlight=False)
        else:
            img, txt, labels, ids = _leave_out_own_points(mem, data, in_memory_source)
            class_embeddings = _adapted_prompts(enc, data.names, templates) if adapt else None
        model = train_fusion(mem, img, txt, labels=labels, class_embeddings=class_embeddings, ids=ids, k=k,
                             epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, search=search, fusion=fusion,
                             aggregator=aggregator, device=device, precision=precision, out_dir=str(out_dir),
                             progress=progress, on_mismatch="restart" if restart else "error")
    _save(out_dir, "best", model)  # beside, fsync, rename: a crash here leaves training's best/ whole
    _report_training(model, out_dir, as_json)


def _leave_out_own_points(mem: Any, data: _Pairs, in_memory_source: str | None) -> tuple:
    """(image, text, labels, ids) of the pairs to train on, ids naming the memory's points of the pairs it holds
    (found by key and image), so that each is left out of its own neighbours; says how many it found."""
    from ..memory import point_id

    img, txt, labels, ids = data.image, data.text, data.labels, None
    source, found, namesake = _in_memory(mem, data.keys, data.image, in_memory_source, data.source_names)
    n = len(data.keys)
    if not found:
        err.print(f"0 of the {n:,} training pairs are in the memory: none to leave out of their own "
                  "neighbours" + (f" ({namesake[1]:,} of their keys are stored under source {namesake[0]}, "
                                  "with other images: other pairs)" if namesake else ""), highlight=False)
        return img, txt, labels, ids
    how = "" if in_memory_source else ", found by their keys"
    err.print(f"{len(found):,} of the {n:,} training pairs are in the memory (source {source}{how}): "
              "each is left out of its own neighbours", highlight=False)
    stored = set(found)  # key and image match: a key stored with another image is another pair,
    # whose point is not to be left out; those pairs get an id no point has (train_fusion wants one each)
    ids = [pid if pid in stored else _unstored_id(source, kk)
           for pid, kk in ((point_id(source, kk), kk) for kk in data.keys)]
    return _first_found(img, txt, labels, ids, stored)


def _adapted_prompts(enc: Any, names: list[str], templates: str) -> np.ndarray:
    """The class prompts' embeddings [C, d] `--adapt` fits weights to (the encoder's, as `reco predict` makes)."""
    from ..classifier import RecoClassifier

    return RecoClassifier(encoder=enc, use_retrieval=False).set_classes(names, templates).raw_class_embeddings_


def _report_training(model: Any, out_dir: Path, as_json: bool) -> None:
    res = {"checkpoint": str(out_dir / "best"), "best_epoch": model.best_epoch, "history": model.history}
    if as_json:
        _emit(res, True)
        return
    table = Table("epoch", "loss", "validation", "baseline", "s", title=f"training (best epoch {model.best_epoch})")
    for h in model.history:
        table.add_row(str(h["epoch"]), f"{h.get('loss', float('nan')):.4f}", f"{h['val']:.4f}",
                      f"{h['val_baseline']:.4f}", f"{h.get('seconds', 0):.1f}")
    out.print(table)
    out.print(f"saved {out_dir / 'best'}")
