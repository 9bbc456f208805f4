"""Readers that yield batches of image-text pairs from files, each batch naming where it came from.

- `EmbeddingShards`: precomputed embeddings in the clip-retrieval / LAION layout
  (`img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy`, `metadata/metadata_N.parquet`).
- `ImageFolder`: image files plus a captions table (parquet / csv / jsonl: file name -> caption).
- `WebDataset`: tar shards of `KEY.jpg|png|webp` + `KEY.txt` (+ optional `KEY.json`), read in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from .encoders import open_image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DUPLICATE_MODES = ("error", "last")  # a key held by more than one shard: refused, or the last shard's row kept


@dataclass
class Batch:
    """One batch of pairs; either embeddings or images (to be encoded) are set."""

    keys: list[str]  # unique within the source; the point id is derived from (source, key)
    captions: list[str]
    origin: str  # the file the batch comes from, for error messages
    row_offset: int  # row of the batch's first item within `origin`
    image_embeddings: np.ndarray | None = None  # [B, d]
    text_embeddings: np.ndarray | None = None  # [B, d]
    images: list[Any] | None = None  # PIL images
    payloads: list[dict[str, Any]] | None = None


class Source(Protocol):
    name: str  # stored in each point's payload as `source`; with the key it derives the point id
    legacy_name: str | None  # what reco-qdrant 0.1 called it by default (a bare basename), if not named explicitly

    def fingerprint(self) -> str:
        """Changes when the files change: keys the resume ledger."""
        ...

    def total(self) -> int | None:
        """Number of items, when known without reading everything."""
        ...

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        """Yield batches in a fixed order, skipping the first `skip` cheaply."""
        ...


def _files_fingerprint(files: Sequence[Path], *extra: Any) -> str:
    h = hashlib.sha1(repr(extra).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_table(path: str | Path) -> pl.DataFrame:
    """A parquet, csv/tsv or jsonl table -> DataFrame, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such table")
    try:
        if p.suffix == ".parquet":
            return pl.read_parquet(p)
        if p.suffix in (".csv", ".tsv"):
            return pl.read_csv(p, separator="\t" if p.suffix == ".tsv" else ",", encoding="utf8")
        if p.suffix in (".jsonl", ".ndjson"):
            return pl.read_ndjson(p)
    except Exception as e:  # polars raises several types (ComputeError, ParseError, ...)
        raise ValueError(f"{p}: cannot read table ({str(e).splitlines()[0]})") from e
    raise ValueError(f"{p}: unknown table format {p.suffix!r}: expected .parquet, .csv, .tsv or .jsonl")


class MissingColumnError(ValueError):
    """A table lacks a column it was told to read; `role` says which setting named it (`<role>_column`)."""

    def __init__(self, origin: str, column: str, columns: Sequence[str], role: str) -> None:
        self.column, self.columns, self.role = column, list(columns), role
        super().__init__(f"{origin}: no column {column!r}; columns are {self.columns}")


def _require_column(df: pl.DataFrame, col: str, origin: str, role: str) -> None:
    if col not in df.columns:
        raise MissingColumnError(origin, col, df.columns, role)


def default_source_name(path: Path) -> str:
    """A source named by the resolved path of its folder: two data sets in folders of the same name
    (`cub/embeddings`, `flowers/embeddings`) never share point ids. Pass `source=` for a name that
    survives moving the files."""
    return str(path.resolve())


def check_keys(keys: Sequence[Any], origin: str, row_offset: int = 0) -> list[str]:
    """Keys as strings, each non-empty and unique; errors name the file and row."""
    out, seen = [], {}
    for i, k in enumerate(keys):
        if k is None or (isinstance(k, float) and k != k) or not str(k).strip():
            raise ValueError(f"{origin}: row {i + row_offset} has an empty key ({k!r}); every item needs a key "
                             "unique within its source")
        k = str(k)
        if k in seen:
            raise ValueError(f"{origin}: rows {seen[k] + row_offset} and {i + row_offset} have the same key {k!r}; "
                             "keys must be unique within a source (one would overwrite the other)")
        seen[k] = i
        out.append(k)
    return out


def _payload_rows(df: pl.DataFrame, skip: Sequence[str]) -> list[dict[str, Any]]:
    cols = [c for c in df.columns if c not in skip]
    return df.select(cols).to_dicts() if cols else [{} for _ in range(df.height)]


# --------------------------------------------------------------------------- precomputed embeddings


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file, truncated or corrupt ({e})") from e


class EmbeddingShards:
    """Precomputed CLIP embeddings in the clip-retrieval layout, read shard by shard with memory maps."""

    def __init__(self, root: str | Path, caption_column: str = "caption", key_column: str | None = None,
                 source: str | None = None, batch_size: int = 4096, duplicates: str = "error") -> None:
        """`duplicates`: what a key found in more than one shard does: "error" (refused, naming both files) or
        "last" (the last shard's row is kept; `replaced_duplicates` counts the rows it replaced)."""
        if duplicates not in DUPLICATE_MODES:
            raise ValueError(f"duplicates={duplicates!r}: expected one of {DUPLICATE_MODES}")
        self.root = Path(root)
        self.caption_column, self.key_column, self.batch_size = caption_column, key_column, batch_size
        self.duplicates = duplicates
        self.replaced_duplicates = 0  # rows of an earlier shard whose key a later shard holds again ("last")
        img = sorted((self.root / "img_emb").glob("img_emb_*.npy"), key=_shard_index)
        if not img:
            raise FileNotFoundError(f"{self.root}: no img_emb/img_emb_*.npy files (clip-retrieval layout)")
        self.shards = []
        for f in img:
            i = _shard_index(f)
            txt = self.root / "text_emb" / f"text_emb_{i}.npy"
            meta = self.root / "metadata" / f"metadata_{i}.parquet"
            for p in (txt, meta):
                if not p.is_file():
                    raise FileNotFoundError(f"{p}: missing, expected beside {f}")
            self.shards.append((f, txt, meta))
        self.name = source or default_source_name(self.root)
        self.legacy_name = None if source else self.root.resolve().name

    def fingerprint(self) -> str:
        files = [p for s in self.shards for p in s]
        extra = () if self.duplicates == "error" else (self.duplicates,)
        return _files_fingerprint(files, self.caption_column, self.key_column, self.batch_size, *extra)

    def check_duplicates(self) -> int:
        """Refuse (or, with duplicates="last", count) keys that more than one shard holds: a later shard's row
        would silently replace an earlier one's point. Reads only the key column of each metadata table."""
        self.replaced_duplicates = 0
        if not self.key_column or len(self.shards) < 2:
            return 0
        frames = []
        for i, (_, _, meta) in enumerate(self.shards):
            try:
                df = pl.read_parquet(meta, columns=[self.key_column])
            except Exception as e:  # polars raises several types: refused here, before anything is stored (an
                # unchecked shard would let a key it shares with another shard overwrite that one's point)
                try:
                    cols = list(pl.read_parquet_schema(meta))
                except Exception:
                    cols = None
                if cols is not None and self.key_column not in cols:
                    raise MissingColumnError(str(meta), self.key_column, cols, "key") from e
                said = " ".join(str(e).split())[:300]
                raise ValueError(f"{meta}: cannot read its key column {self.key_column!r} ({type(e).__name__}: "
                                 f"{said}), so keys cannot be checked for duplicates across the {len(self.shards)} "
                                 "shards; nothing was ingested: replace the file with a readable copy (re-export "
                                 "it) or move the shard (its img_emb, text_emb and metadata files) away") from e
            frames.append(df.select(pl.col(self.key_column).cast(pl.Utf8).alias("key"))
                          .with_row_index("row").with_columns(pl.lit(i).alias("shard")))
        keys = pl.concat(frames)
        dup = keys.filter(pl.col("key").is_not_null() & pl.col("key").is_duplicated())
        if dup.is_empty():
            return 0
        per_key = dup.group_by("key", maintain_order=True).agg(pl.col("shard"), pl.col("row"))
        across = per_key.filter(pl.col("shard").list.n_unique() > 1)
        if across.is_empty():
            return 0  # duplicates within one shard only: refused by the batch reader, naming the rows
        if self.duplicates == "error":
            first = across.row(0, named=True)
            (sa, ra), (sb, rb) = [(s, r) for s, r in zip(first["shard"], first["row"])][:2]
            if sa == sb:  # the first two inside one shard: name a pair across shards
                sb, rb = next((s, r) for s, r in zip(first["shard"], first["row"]) if s != sa)
            fa, fb = self.shards[sa][2], self.shards[sb][2]
            raise ValueError(f"{fa} row {ra} and {fb} row {rb} have the same key {first['key']!r} (column "
                             f"{self.key_column!r}), and {across.height:,} keys in all appear in more than one shard; "
                             "keys must be unique within a source (the later row would overwrite the earlier): fix "
                             "the metadata, or ingest with duplicates='last' (--duplicates last) to keep the last "
                             "shard's row")
        self.replaced_duplicates = int(across.select(pl.col("shard").list.len().sum()).item()) - across.height
        return self.replaced_duplicates

    def _rows(self, shard: tuple[Path, Path, Path]) -> int:
        return int(_load_npy(shard[0]).shape[0])

    def total(self) -> int:
        return sum(self._rows(s) for s in self.shards)

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        self.check_duplicates()  # all shards, also those a resumed run skips
        seen = 0
        for img_path, txt_path, meta_path in self.shards:
            img, txt = _load_npy(img_path), _load_npy(txt_path)
            n = img.shape[0]
            n_batches = -(-n // self.batch_size)
            if seen + n_batches <= skip:
                seen += n_batches
                continue
            meta = read_table(meta_path)
            if not (txt.shape[0] == meta.height == n):
                raise ValueError(f"{self.root}: row counts differ: {img_path.name} has {n}, {txt_path.name} "
                                 f"{txt.shape[0]}, {meta_path.name} {meta.height}")
            _require_column(meta, self.caption_column, str(meta_path), "caption")
            if self.key_column:
                _require_column(meta, self.key_column, str(meta_path), "key")
            captions = meta[self.caption_column].cast(pl.Utf8).fill_null("").to_list()
            keys = (check_keys(meta[self.key_column].cast(pl.Utf8).to_list(), f"{meta_path} column {self.key_column!r}")
                    if self.key_column else [f"{_shard_index(img_path)}:{r}" for r in range(n)])
            payloads = _payload_rows(meta, [self.caption_column])
            for b in range(n_batches):
                seen += 1
                if seen <= skip:
                    continue
                s, e = b * self.batch_size, min(n, (b + 1) * self.batch_size)
                yield Batch(keys[s:e], captions[s:e], str(img_path), s,
                            image_embeddings=np.asarray(img[s:e]), text_embeddings=np.asarray(txt[s:e]),
                            payloads=payloads[s:e])


def _shard_index(p: Path) -> int:
    m = re.search(r"_(\d+)\.npy$", p.name)
    if not m:
        raise ValueError(f"{p}: expected a name like img_emb_0.npy")
    return int(m.group(1))


def write_embedding_shards(root: str | Path, image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                           captions: Sequence[str], shard_size: int = 10_000,
                           extra: dict[str, Sequence[Any]] | None = None) -> list[Path]:
    """Write embeddings in the clip-retrieval layout (to export a memory or build fixtures)."""
    root = Path(root)
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    written = []
    for i, s in enumerate(range(0, len(captions), shard_size)):
        e = min(len(captions), s + shard_size)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", np.asarray(image_embeddings[s:e], np.float32))
        np.save(root / "text_emb" / f"text_emb_{i}.npy", np.asarray(text_embeddings[s:e], np.float32))
        cols: dict[str, Any] = {"caption": list(captions[s:e])}
        for k, v in (extra or {}).items():
            cols[k] = list(v[s:e])
        pl.DataFrame(cols).write_parquet(root / "metadata" / f"metadata_{i}.parquet")
        written.append(root / "img_emb" / f"img_emb_{i}.npy")
    return written


# --------------------------------------------------------------------------- image folder


class ImageFolder:
    """Image files under `root` with captions from a table (columns `file_column`, `caption_column`)."""

    def __init__(self, root: str | Path, captions: str | Path, file_column: str = "file",
                 caption_column: str = "caption", source: str | None = None, batch_size: int = 64) -> None:
        self.root, self.table_path = Path(root), Path(captions)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such image folder")
        self.table = read_table(self.table_path)
        _require_column(self.table, file_column, str(self.table_path), "file")
        _require_column(self.table, caption_column, str(self.table_path), "caption")
        self.file_column, self.caption_column, self.batch_size = file_column, caption_column, batch_size
        self.name = source or default_source_name(self.root)
        self.legacy_name = None if source else self.root.resolve().name
        self.keys = check_keys(self.table[file_column].cast(pl.Utf8).to_list(),
                               f"{self.table_path} column {file_column!r}")

    def fingerprint(self) -> str:
        return _files_fingerprint([self.table_path], str(self.root.resolve()), self.batch_size)

    def files_fingerprint(self) -> str:
        """Changes when any image file or the table changes (one stat per image: call it once, not per batch)."""
        root = self.root.resolve()
        files = [p for p in (root / f for f in self.keys) if p.is_file()]
        return _files_fingerprint([self.table_path, *files], str(root), self.file_column, self.caption_column)

    def total(self) -> int:
        return self.table.height

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        files = self.keys
        captions = self.table[self.caption_column].cast(pl.Utf8).fill_null("").to_list()
        payloads = _payload_rows(self.table, [self.file_column, self.caption_column])
        for b, s in enumerate(range(0, len(files), self.batch_size)):
            if b < skip:
                continue
            e = min(len(files), s + self.batch_size)
            images = []
            for row in range(s, e):
                path = (self.root / files[row]).resolve()
                if self.root.resolve() not in path.parents:
                    raise ValueError(f"{self.table_path} row {row}: {files[row]!r} points outside {self.root}")
                if not path.is_file():
                    raise FileNotFoundError(f"{self.table_path} row {row}: image {path} not found")
                images.append(open_image(path))
                payloads[row]["uri"] = str(path)
            yield Batch(files[s:e], captions[s:e], str(self.table_path), s, images=images,
                        payloads=payloads[s:e])


# --------------------------------------------------------------------------- webdataset


class WebDataset:
    """WebDataset tar shards, streamed: members are read into memory, never extracted to disk."""

    def __init__(self, shards: Sequence[str | Path], source: str | None = None, batch_size: int = 64) -> None:
        self.shards = [Path(s) for s in shards]
        for s in self.shards:
            if not s.is_file():
                raise FileNotFoundError(f"{s}: no such tar shard")
        self.batch_size = batch_size
        # keys are "<shard path relative to the shards' common folder>/<sample key>": train/00000.tar and
        # val/00000.tar ingested together never collide, and apart they are two sources
        self.base = Path(os.path.commonpath([s.resolve().parent for s in self.shards])) if self.shards else Path(".")
        self.name = source or default_source_name(self.base)
        self.legacy_name = None if source else (self.shards[0].parent.resolve().name if self.shards else None)

    def fingerprint(self) -> str:
        return _files_fingerprint(self.shards, self.batch_size)

    def total(self) -> int | None:
        return None

    def _samples(self, shard: Path) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
        """(key, {ext: (member name, bytes)}) for each sample, grouping consecutive members by key."""
        key, group = None, {}
        try:
            with tarfile.open(shard, "r|*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    k = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                    ext = "." + base.split(".", 1)[1].lower()
                    if k != key and key is not None:
                        yield key, group
                        group = {}
                    key = k
                    f = tar.extractfile(m)
                    group[ext] = (m.name, f.read() if f else b"")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{shard}: not a readable tar shard ({e})") from e
        if key is not None:
            yield key, group

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        b = 0
        for shard in self.shards:
            keys, caps, ims, pays, row0 = [], [], [], [], 0
            prefix, seen = shard.resolve().relative_to(self.base).as_posix(), set()
            for row, (key, group) in enumerate(self._samples(shard)):
                if key in seen:
                    raise ValueError(f"{shard}: sample key {key!r} appears twice (row {row}); keys must be unique")
                seen.add(key)
                if b >= skip:
                    caption, image, extra = self._decode(shard, key, group)
                    keys.append(f"{prefix}/{key}")
                    caps.append(caption)
                    ims.append(image)
                    pays.append(extra)
                else:
                    keys.append(key)
                if len(keys) == self.batch_size:
                    if b >= skip:
                        yield Batch(keys, caps, str(shard), row0, images=ims, payloads=pays)
                    b += 1
                    keys, caps, ims, pays, row0 = [], [], [], [], row + 1
            if keys:
                if b >= skip:
                    yield Batch(keys, caps, str(shard), row0, images=ims, payloads=pays)
                b += 1

    @staticmethod
    def _decode(shard: Path, key: str, group: dict[str, tuple[str, bytes]]) -> tuple[str, Any, dict]:
        img = next((group[e] for e in IMAGE_EXTS if e in group), None)
        if img is None:
            raise ValueError(f"{shard}: sample {key!r} has no image member ({', '.join(IMAGE_EXTS)})")
        if ".txt" not in group:
            raise ValueError(f"{shard}: sample {key!r} has no .txt caption")
        name, raw = group[".txt"]
        try:
            caption = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{shard}: {name} is not UTF-8 text ({e})") from e
        extra: dict[str, Any] = {}
        if ".json" in group:
            try:
                extra = json.loads(group[".json"][1])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{shard}: {group['.json'][0]} is not valid JSON ({e})") from e
            if not isinstance(extra, dict):
                raise ValueError(f"{shard}: {group['.json'][0]} must hold a JSON object")
        try:
            image = open_image(io.BytesIO(img[1]))
        except ValueError as e:
            raise ValueError(f"{shard}: {img[0]} is not a readable image") from e
        extra["uri"] = f"{shard}#{img[0]}"
        return caption, image, extra


# --------------------------------------------------------------------------- a folder in either layout

CAPTION_TABLES = ("captions.parquet", "captions.csv", "captions.tsv", "captions.jsonl")


def open_folder(path: str | Path, source: str | None = None,
                batch_size: int | None = None) -> EmbeddingShards | ImageFolder:
    """The source for a data folder in one of the two documented layouts, found by looking at it.

    - clip-retrieval embeddings: `img_emb/`, `text_emb/`, `metadata/` (keys: the metadata's `key` column
      when it has one, as img2dataset writes it, else shard and row);
    - images plus a captions table: `captions.parquet|csv|tsv|jsonl` (columns `file`, `caption`; files
      relative to the folder).

    This is what `reco ingest auto` and the compose `ingest` service read.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    if (root / "img_emb").is_dir():
        shards = EmbeddingShards(root, source=source, batch_size=batch_size or 4096)
        if "key" in pl.read_parquet_schema(shards.shards[0][2]):
            shards.key_column = "key"
        return shards
    tables = [root / t for t in CAPTION_TABLES if (root / t).is_file()]
    if len(tables) == 1:
        return ImageFolder(root, tables[0], source=source, batch_size=batch_size or 64)
    if tables:
        raise ValueError(f"{root}: several captions tables ({', '.join(t.name for t in tables)}): keep one")
    raise FileNotFoundError(f"{root}: neither layout found: expected img_emb/ text_emb/ metadata/ (clip-retrieval "
                            f"embeddings) or images with one of {', '.join(CAPTION_TABLES)}")
