"""Frozen image/text encoders: the `Encoder` protocol and the one open_clip factory."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import socket
import sys
import threading
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from .progress import progress_bar

_CONFIG_DIR = Path(__file__).parent / "model_configs"


@runtime_checkable
class Encoder(Protocol):
    """What the rest of the package needs from an encoder pair (f for images, g for texts)."""

    id: str  # identifies weights and preprocessing; recorded with every memory
    dim: int

    def encode_images(self, images: Sequence[Any], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Images (paths or PIL) -> float32 [N, dim], L2-normalised."""
        ...

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> float32 [N, dim], L2-normalised."""
        ...


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def file_digest(path: str | Path, n: int = 16) -> str:
    """First `n` hex digits of a file's sha256 (identifies local checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def open_image(image: Any) -> Image.Image:
    """A path or PIL image -> RGB PIL image; a clear error naming the file when it is not an image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{image}: not a readable image ({e})") from e


@cache
def _register_configs() -> None:
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)


# --------------------------------------------------------------------------- pretrained weights: fail fast

CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")
PROBE_TIMEOUT_S = 2.0  # one connection attempt to the download host; no retries


class WeightsUnavailableError(RuntimeError):
    """An open_clip tag's weights are not cached here and cannot be downloaded now (offline, host unreachable)."""

    def __init__(self, model_name: str, tag: str, why: str, where: str, filename: str, cache: str) -> None:
        self.model_name, self.tag, self.why, self.where, self.filename, self.cache = (
            model_name, tag, why, where, filename, cache)
        self.headline = (f"the pretrained weights {model_name} / {tag} are not in the cache ({cache}) and cannot be "
                         f"downloaded: {why}")
        self.fixes = [  # (what to pass, what it is)
            ("pretrained=FILE", f"a local checkpoint file ({filename} from {where})"),
            ("HF_HOME=DIR", "a cache directory that holds them (DIR/hub, filled on a machine with internet; "
                            "HF_HUB_CACHE names the hub folder itself)"),
            ("pretrained=None", "random weights, for a dry run of the flow"),
        ]
        super().__init__(f"{self.headline}. Ways forward: " + "; ".join(f"{a}: {b}" for a, b in self.fixes))


@cache
def _pretrained_table() -> Any:
    """open_clip's table of pretrained tags (`open_clip.pretrained`), read without importing open_clip.

    Importing open_clip imports torchvision and torch._dynamo (about 3 s here): a download that cannot happen
    must be found out before that. The table's module needs only open_clip's constants, so it is loaded under
    a private package name; if that ever fails, open_clip is imported the ordinary way."""
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.pretrained")
    try:
        spec = importlib.util.find_spec("open_clip")
        name = f"{__name__}._open_clip_tables"
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations or [])
        sys.modules[name] = pkg
        return importlib.import_module(f"{name}.pretrained")
    except Exception:  # a future open_clip layout: the slow, ordinary way
        sys.modules.pop(f"{__name__}._open_clip_tables", None)
        return importlib.import_module("open_clip.pretrained")


def _proxy_for(url: str) -> str | None:
    """The proxy a request to `url` would go through ($https_proxy, $all_proxy, ... less $no_proxy), if any."""
    import urllib.request

    u = urlparse(url)
    proxy = urllib.request.getproxies().get(u.scheme) or urllib.request.getproxies().get("all")
    if not proxy or urllib.request.proxy_bypass(u.hostname or ""):
        return None
    # `https_proxy=proxy:3128` (no scheme) is an http proxy to huggingface_hub/httpx and to urllib alike
    return proxy if "://" in proxy else f"http://{proxy}"


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url`'s host (or the proxy that would carry the request) cannot be reached, or None when it answers.

    One TCP connection attempt, bounded by `timeout` (name resolution included: it runs in a thread). Behind a
    proxy only the proxy is tried: one that answers may still fail to reach the host (the download then fails
    the ordinary, slower way)."""
    proxy = _proxy_for(url)
    target = urlparse(proxy or url)
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["error"] = None
        except OSError as e:
            outcome["error"] = e

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    what = f"the proxy {host}:{port}" if proxy else f"{host}:{port}"
    if "error" not in outcome:
        return f"{what} gave no answer within {timeout:.0f} s"
    e = outcome["error"]
    if e is None:
        return None
    return f"{what} cannot be reached ({getattr(e, 'strerror', None) or e})"


def _hub_cached(repo: str, filenames: Sequence[str]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for f in filenames:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return hit
    return None


def _safe_alternatives(table: Any, filename: str) -> list[str]:
    """The .safetensors files open_clip tries before `filename` on the hub (its `_get_safe_alternatives`), and
    only those: a cached file of another name would not be loaded, so it is no reason to skip the check."""
    if not getattr(table, "_has_safetensors", True):
        return []
    alternatives = getattr(table, "_get_safe_alternatives", None)
    if alternatives is not None:
        return list(alternatives(filename))
    if filename == table.HF_WEIGHTS_NAME:
        return [table.HF_SAFE_WEIGHTS_NAME]
    return [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []


def check_weights(model_name: str, pretrained: str | None) -> str | None:
    """Before open_clip is imported: make sure `pretrained` can be loaded without a long failing download.

    Returns "cached" when a tag's weights are in the local cache (then load them offline: no network at all),
    "download" when they are not but the download host answers, None when there is nothing to check (random
    weights, a checkpoint file, a model the table does not know). Raises `WeightsUnavailableError` when they are
    neither cached nor downloadable now (HF_HUB_OFFLINE set, or the host unreachable), FileNotFoundError for a
    checkpoint path that is not a file, ValueError for a tag the model does not have."""
    if pretrained is None or Path(pretrained).is_file() or model_name.startswith(("hf-hub:", "local-dir:")):
        return None
    table = _pretrained_table()
    cfg = table.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        if "/" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES):
            raise FileNotFoundError(f"pretrained {pretrained}: no such checkpoint file")
        tags = table.list_pretrained_tags_by_model(model_name)
        if tags:
            raise ValueError(f"open_clip has no pretrained weights {pretrained!r} for {model_name}: its tags are "
                             f"{', '.join(tags)}; or give a checkpoint file, or none (random weights)")
        return None  # a model without tags (e.g. our own configs): open_clip says what is wrong
    from huggingface_hub import constants

    hub = cfg.get("hf_hub", "")
    if hub:  # open_clip prefers the hub when huggingface_hub is installed (it is one of our dependencies)
        repo, filename = os.path.split(hub)
        filename = filename or table.HF_WEIGHTS_NAME
        safe = _safe_alternatives(table, filename)
        if _hub_cached(repo, [*safe, filename]):
            return "cached"
        url, cache_dir, where = constants.ENDPOINT, constants.HF_HUB_CACHE, f"https://huggingface.co/{repo}"
        filename = safe[0] if safe else filename
    else:
        url = cfg["url"]
        cache_dir = os.path.expanduser("~/.cache/clip")
        if os.path.isfile(os.path.join(cache_dir, os.path.basename(url))):
            return None  # open_clip reads it without the network
        filename, where = os.path.basename(url), url
    if constants.HF_HUB_OFFLINE and hub:
        why = "offline mode is on (HF_HUB_OFFLINE is set)"
    else:
        why = unreachable(url)
    if why:
        raise WeightsUnavailableError(model_name, pretrained, why, where, filename, cache_dir)
    return "download"


@contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """Hugging Face hub calls answered from the local cache only (no update check, no retries) while `on`."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextmanager
def _without_random_init_notice() -> Iterator[None]:
    """open_clip logs a warning when it builds a model without weights: that is what pretrained=None asked for
    (the encoder id, `random-seed<N>`, records it)."""
    notice = _RandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _l2(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


class OpenClipEncoder:
    """An open_clip model, frozen in eval mode, with its own preprocessing and tokenizer.

    `pretrained` is an open_clip tag (e.g. "laion2b_s34b_b79k": read from the Hugging Face cache, $HF_HOME, without
    the network when it is there, else downloaded once), a local checkpoint file (.pt/.bin/.safetensors), or None
    for random weights drawn with `seed` (tests and demos only). Weights that are neither cached nor downloadable
    now raise `WeightsUnavailableError` at once, naming them and the ways forward.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "laion2b_s34b_b79k",
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        status = check_weights(model_name, pretrained)  # before open_clip's slow import: fail fast
        import open_clip

        _register_configs()
        self.device = device or default_device()
        if pretrained is None:
            tag = f"random-seed{seed}"
            torch.manual_seed(seed)
        elif Path(pretrained).is_file():
            tag = f"file-sha256:{file_digest(pretrained)}"
        else:
            tag = pretrained
        with _hub_offline(status == "cached"), _without_random_init_notice():
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=self.device
            )
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])
        self.id = f"open_clip/{model_name}/{tag}"
        # how to load it again (recorded with a memory, so later commands need no --model)
        self.spec = {"kind": "open_clip", "name": model_name, "seed": seed,
                     "pretrained": str(Path(pretrained).resolve()) if tag.startswith("file-") else pretrained}
        size = getattr(self.model.visual, "image_size", None)
        self.preprocess_id = f"size={size}"

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Images (paths or PIL) -> float32 [N, dim], L2-normalised."""
        out = [np.zeros((0, self.dim), np.float32)]
        with progress_bar("encode images", len(images), progress) as advance:
            for i in range(0, len(images), batch_size):
                x = torch.stack([self.preprocess(open_image(im)) for im in images[i : i + batch_size]])
                out.append(_l2(self.model.encode_image(x.to(self.device))))
                advance(len(x))
        return np.concatenate(out)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> float32 [N, dim], L2-normalised."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            out.append(_l2(self.model.encode_text(tokens)))
        return np.concatenate(out)


class SentenceTransformersEncoder:
    """A sentence-transformers CLIP-style model (local folder or hub name), e.g. multilingual CLIP."""

    def __init__(self, model_name_or_path: str, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.device = device or default_device()
        self.model = SentenceTransformer(model_name_or_path, device=self.device)
        self.model.eval()
        path = Path(model_name_or_path)
        tag = f"dir-sha256:{_dir_digest(path)}" if path.is_dir() else model_name_or_path
        self.id = f"sentence-transformers/{tag}"
        self.spec = {"kind": "sentence-transformers",
                     "name": str(path.resolve()) if path.is_dir() else model_name_or_path}
        self.dim = int(self.encode_texts(["x"]).shape[1])

    def encode_images(self, images: Sequence[Any], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Images (paths or PIL) -> float32 [N, dim], L2-normalised."""
        out = [np.zeros((0, self.dim), np.float32)]
        with progress_bar("encode images", len(images), progress) as advance:
            for i in range(0, len(images), batch_size):
                ims = [open_image(im) for im in images[i : i + batch_size]]
                emb = self.model.encode(ims, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
                out.append(np.asarray(emb, np.float32).reshape(len(ims), -1))
                advance(len(ims))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> float32 [N, dim], L2-normalised."""
        emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True)
        return np.asarray(emb, np.float32).reshape(len(texts), -1)


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json"}):
        h.update(f.name.encode())
        h.update(file_digest(f, 64).encode())
    return h.hexdigest()[:16]


def load_encoder(
    name: str = "ViT-B-32",
    pretrained: str | None = "laion2b_s34b_b79k",
    device: str | None = None,
    kind: str = "open_clip",
    seed: int = 0,
) -> Encoder:
    """The one encoder factory: `kind` "open_clip" (default) or "sentence-transformers"."""
    if kind == "open_clip":
        return OpenClipEncoder(name, pretrained, device=device, seed=seed)
    if kind in ("sentence-transformers", "st"):
        return SentenceTransformersEncoder(name, device=device)
    raise ValueError(f"unknown encoder kind {kind!r}: expected 'open_clip' or 'sentence-transformers'")


def encoder_from_record(record: dict[str, Any], device: str | None = None) -> Encoder:
    """Load the encoder a memory records (`Memory.encoder_record`), checking that it is the same one."""
    spec = record.get("load")
    parts = str(record["id"]).split("/")
    if not spec and len(parts) == 3 and parts[0] == "open_clip" and not parts[2].startswith(("file-", "random-")):
        spec = {"kind": "open_clip", "name": parts[1], "pretrained": parts[2]}  # an open_clip name + tag says it all
    if not spec:
        raise ValueError(f"the memory records encoder {record['id']!r} but not how to load it (ingested from "
                         "precomputed embeddings, or by reco-qdrant 0.1): pass --model/--pretrained (or an encoder)")
    enc = load_encoder(spec["name"], spec.get("pretrained"), device=device, kind=spec["kind"], seed=spec.get("seed", 0))
    if enc.id != record["id"]:
        raise ValueError(f"the memory's encoder {record['id']!r} now loads as {enc.id!r} (its checkpoint changed?); "
                         "pass the original with --model/--pretrained")
    return enc
