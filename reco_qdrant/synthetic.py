"""A synthetic fine-grained world at the embedding level, for demos and tests.

It simulates RECO's hypothesis. Each class c has a latent concept u_c = norm(s_j + beta f_c)
(s_j its super-class, f_c its fine identity). Images embed near u_c. Texts that name c embed near
the text encoder's *idea* of the name: u_c for common classes, but for rare classes the fine
identity is replaced by a random direction r_c shared by every text naming c. So image-image and
text-text neighbourhoods are good, while image-text alignment of rare class names is poor: a
zero-shot classifier only gets the super-class right, and looking up captions of visually similar
images (or images of textually similar captions) recovers the fine identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class WorldConfig:
    dim: int = 64  # embedding dimension
    n_superclasses: int = 8
    classes_per_super: int = 25
    eval_fraction: float = 0.5  # share of classes held out for evaluation (never trained on)
    rare_fraction: float = 0.8  # share of classes whose names the text encoder has not aligned
    beta: float = 1.0  # weight of the fine identity against the super-class direction
    image_noise: float = 1.2  # per-image noise (its norm, against unit class concepts)
    text_noise: float = 1.2  # per-caption noise
    prompt_noise: float = 0.15  # noise of a class-name prompt around the text encoder's idea
    modality_gap: float = 0.6  # shared offset of each modality (CLIP's modality gap)
    memory_per_class: int = 40  # image-text pairs per class in the memory
    mismatch_fraction: float = 0.15  # memory pairs whose caption names another class
    train_per_class: int = 40  # training pairs per training class
    train_in_memory_fraction: float = 0.5  # training pairs also stored in the memory (as on the web)
    eval_per_class: int = 10  # evaluation images per evaluation class
    seed: int = 0


@dataclass
class World:
    """Arrays are float32 and L2-normalised; labels index `class_names`."""

    cfg: WorldConfig
    class_names: list[str]
    rare: np.ndarray  # [C] bool
    train_classes: np.ndarray  # [Ct] class indices
    eval_classes: np.ndarray  # [Ce] class indices, disjoint from train_classes
    memory_image: np.ndarray  # [M, d]
    memory_text: np.ndarray  # [M, d]
    memory_captions: list[str]
    memory_labels: np.ndarray  # [M] class of the image
    memory_ids: list[str]  # keys of the memory pairs (training pairs in memory keep their training key)
    train_image: np.ndarray  # [N, d]
    train_text: np.ndarray  # [N, d]
    train_labels: np.ndarray  # [N]
    train_ids: list[str]
    eval_image: np.ndarray  # [E, d]
    eval_labels: np.ndarray  # [E]
    class_text: np.ndarray  # [C, d] class-name prompt embedding of every class
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _rand_dirs(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return _norm(rng.standard_normal((n, d)))


def make_world(cfg: WorldConfig | None = None, **overrides: object) -> World:
    """Build the world; `overrides` replace `WorldConfig` fields (e.g. `make_world(seed=1)`)."""
    cfg = cfg or WorldConfig()
    if overrides:
        cfg = WorldConfig(**{**cfg.__dict__, **overrides})
    rng = np.random.default_rng(cfg.seed)
    d, c = cfg.dim, cfg.n_superclasses * cfg.classes_per_super
    supers = _rand_dirs(rng, cfg.n_superclasses, d)
    sup_of = np.repeat(np.arange(cfg.n_superclasses), cfg.classes_per_super)
    concept = _norm(supers[sup_of] + cfg.beta * _rand_dirs(rng, c, d))  # what images show
    rare = rng.random(c) < cfg.rare_fraction
    idea = np.where(rare[:, None], _norm(supers[sup_of] + cfg.beta * _rand_dirs(rng, c, d)), concept)
    gap_img, gap_txt = _rand_dirs(rng, 2, d) * cfg.modality_gap

    def images(labels: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((len(labels), d)) / np.sqrt(d)
        return _norm(concept[labels] + cfg.image_noise * noise + gap_img)

    def texts(labels: np.ndarray, noise_level: float) -> np.ndarray:
        noise = rng.standard_normal((len(labels), d)) / np.sqrt(d)
        return _norm(idea[labels] + noise_level * noise + gap_txt)

    names = [f"species-{s:02d}-{i:03d}" for s in range(cfg.n_superclasses) for i in range(cfg.classes_per_super)]
    # Split classes within each super-class so both halves cover every super-class.
    perm = rng.permutation(c)
    is_eval = np.zeros(c, bool)
    for s in range(cfg.n_superclasses):
        members = perm[sup_of[perm] == s]
        is_eval[members[: int(round(len(members) * cfg.eval_fraction))]] = True
    train_classes, eval_classes = np.flatnonzero(~is_eval), np.flatnonzero(is_eval)

    # training pairs (a share of them also lives in the memory, as on the web)
    train_labels = np.repeat(train_classes, cfg.train_per_class)
    train_image, train_text = images(train_labels), texts(train_labels, cfg.text_noise)
    train_ids = [f"train-{i}" for i in range(len(train_labels))]
    in_mem = np.flatnonzero(rng.random(len(train_labels)) < cfg.train_in_memory_fraction)

    # the memory: pairs of every class, some captions naming another class of the same super-class
    mem_labels = np.repeat(np.arange(c), cfg.memory_per_class)
    cap_labels = mem_labels.copy()
    wrong = rng.random(len(mem_labels)) < cfg.mismatch_fraction
    shift = rng.integers(1, cfg.classes_per_super, wrong.sum())
    cap_labels[wrong] = sup_of[mem_labels[wrong]] * cfg.classes_per_super + (
        (mem_labels[wrong] % cfg.classes_per_super + shift) % cfg.classes_per_super)
    memory_image = np.concatenate([images(mem_labels), train_image[in_mem]])
    memory_text = np.concatenate([texts(cap_labels, cfg.text_noise), train_text[in_mem]])
    memory_labels = np.concatenate([mem_labels, train_labels[in_mem]])
    cap_all = np.concatenate([cap_labels, train_labels[in_mem]])
    memory_captions = [f"a photo of a {names[j]} seen on the web, #{i}" for i, j in enumerate(cap_all)]
    memory_ids = [f"web-{i}" for i in range(len(mem_labels))] + [train_ids[i] for i in in_mem]

    eval_labels = np.repeat(eval_classes, cfg.eval_per_class)
    return World(
        cfg=cfg, class_names=names, rare=rare, train_classes=train_classes, eval_classes=eval_classes,
        memory_image=memory_image, memory_text=memory_text, memory_captions=memory_captions,
        memory_labels=memory_labels, memory_ids=memory_ids, train_image=train_image, train_text=train_text,
        train_labels=train_labels, train_ids=train_ids, eval_image=images(eval_labels),
        eval_labels=eval_labels, class_text=texts(np.arange(c), cfg.prompt_noise),
    )


# --------------------------------------------------------------------------- a world of image files

IMAGE_CLASSES = {  # name -> (RGB colour, shape): look-alike pairs differ in one attribute only
    "crimson rosefinch": ((200, 30, 40), "disc"), "scarlet minivet": ((200, 30, 40), "box"),
    "azure tit": ((40, 80, 210), "disc"), "indigo bunting": ((40, 80, 210), "box"),
    "citrine wagtail": ((220, 200, 40), "disc"), "yellowhammer": ((220, 200, 40), "box"),
    "olive warbler": ((70, 150, 60), "disc"), "greenfinch": ((70, 150, 60), "box"),
}


@dataclass
class ImageWorld:
    """Image files on disk: a captioned memory folder and an evaluation ImageFolder (root/<class>/<image>)."""

    class_names: list[str]
    memory_dir: str  # images of the memory
    captions: str  # table file, caption, label (csv)
    eval_dir: str  # eval_dir/<class name with underscores>/*.png


def _draw(rng: np.random.Generator, colour: tuple[int, int, int], shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.4, 0.6, 2) * size
    r = rng.uniform(0.3, 0.4) * size
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if shape == "disc" else (
        (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r))
    img = np.empty((size, size, 3), np.float32)
    img[:] = 200 + rng.uniform(-10, 10, 3)  # background
    img[inside] = np.asarray(colour, np.float32) + rng.normal(0, 12, 3)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def write_image_world(root: str | Path, per_class: int = 24, eval_per_class: int = 6, size: int = 64,
                      seed: int = 0) -> ImageWorld:
    """Write a tiny fine-grained image world to `root`: a memory of captioned images and an evaluation set.

    Classes come in look-alike pairs (same colour, different shape); captions name the class in
    varied sentences, a few of them wrong, as web captions are. Meant for notebooks and tests that
    need real files and a real image encoder (randomly initialised) rather than embeddings.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    mem, ev = root / "memory", root / "eval"
    mem.mkdir(parents=True, exist_ok=True)
    names = list(IMAGE_CLASSES)
    phrases = ["a photo of a {}", "{} in the garden", "my best shot of a {} today", "a {} on a branch",
               "spotted a {} near the lake"]
    rows = ["file,caption,label"]
    for c, name in enumerate(names):
        colour, shape = IMAGE_CLASSES[name]
        (ev / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            said = name if rng.random() > 0.1 else names[c ^ 1]  # 10% of captions name the look-alike
            Image.fromarray(_draw(rng, colour, shape, size)).save(mem / f"{c}_{i}.png")
            rows.append(f"{c}_{i}.png,\"{phrases[i % len(phrases)].format(said)}\",{name}")
        for i in range(eval_per_class):
            Image.fromarray(_draw(rng, colour, shape, size)).save(ev / name.replace(" ", "_") / f"{i}.png")
    (root / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return ImageWorld(names, str(mem), str(root / "captions.csv"), str(ev))
