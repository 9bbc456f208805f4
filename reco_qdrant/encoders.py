"""Frozen image/text encoders: the `Encoder` protocol and the one open_clip factory."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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


def _l2(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


class OpenClipEncoder:
    """An open_clip model, frozen in eval mode, with its own preprocessing and tokenizer.

    `pretrained` is an open_clip tag (e.g. "laion2b_s34b_b79k", downloaded where the network allows),
    a local checkpoint file (.pt/.bin/.safetensors), or None for random weights drawn with `seed`
    (tests and demos only).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "laion2b_s34b_b79k",
        device: str | None = None,
        seed: int = 0,
    ) -> None:
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
