"""Training the fusion model: a neighbour cache built once, then a contrastive loop with early stopping.

Validation is split by class: the fusion must help on classes it never saw, so the best epoch is
chosen by zero-shot accuracy on held-out classes and kept; training stops when it stops improving.
Without labels (RECO's own setting: unlabelled web pairs), the pairs are clustered into pseudo-classes
(`clusters.py`), each with its medoid caption as a prompt, and those stand in for classes: coverage
training (a share of them hidden from the memory) and the class loss run on clusters of the pairs;
validation runs on held-out clusters of the images, scored with and without the hidden ones. With labels
and class embeddings, a second run on every labelled pair, no class held out, for the whole schedule, gives
weights adapted to the classes trained on (`FusionModel.seen`, used only with
`RecoClassifier(weights="adapted")`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import durable
from .clusters import medoids, pseudo_classes
from .encoders import default_device
from .fusion import FusionConfig, FusionModel, cross_alignment
from .ingest import cache_root as package_cache_root
from .loss import reco_loss
from .memory import Memory, validate_embeddings
from .neighbors import mode_modalities, retrieve
from .progress import progress_bar


@dataclass
class TrainConfig:
    k: int = 10  # neighbours per query
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    batch_size: int = 128
    lr: float | None = None  # default: the aggregator's (DEFAULT_LR)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # of all steps, then cosine decay
    patience: int = 6  # epochs without validation improvement before stopping
    val_fraction: float = 0.2  # of classes (real or pseudo; of pairs where there are neither) held out for validation
    seed: int = 0
    device: str | None = None  # default: cuda when available
    self_exclusion: bool = True  # a training query never retrieves itself or its near-duplicates
    dedup_threshold: float = 0.98  # cosine in the searched modality
    # HNSW width of the training-set searches (None: the memory's). Measured on CLIP-like data: recall@10 0.998
    # at 100k points, 0.965 at 1M, at half the time of 128; a missed neighbour is replaced by the next one.
    hnsw_ef: int | None = 64
    search: str = "uni"
    fusion: str = "cross"
    aggregator: str = "relevance"  # "relevance" (default), "transformer" (the paper's), "mean"
    projection: bool = True  # relevance aggregator: learn the D x D map on fused neighbours
    uni_term: bool = True  # relevance aggregator: also add the neighbours' mean in the searched modality
    uni_projection: bool = False  # relevance aggregator: also learn a D x D map on that mean (see FusionConfig)
    n_heads: int = 8
    dropout: float = 0.1
    token_dropout: float = 0.2
    swap_fraction: float = 0.25  # of training queries given another query's neighbours (teaches distrust)
    uncovered_fraction: float = 0.5  # of classes treated as absent from the memory in training and validation
    misaligned_fraction: float = 0.25  # of training steps in a simulated world where image and text do not align
    # without labels: pairs per pseudo-class (k-means on the pairs, `clusters.py`); the clusters, each with its
    # medoid caption as prompt, stand in for classes in coverage training, the class loss and validation; 0: off
    pseudo_class_size: int = 32
    class_loss: float = 1.0  # weight of the zero-shot loss: refined images vs refined (pseudo-)class prompts
    # with labels, class embeddings and validation: also train a model on every labelled pair for the full
    # schedule, for the classes trained on (`FusionModel.seen`); early stopping picks the one for other classes
    seen_model: bool = True
    # that model also learns the map on the searched modality's mean (`uni_projection`); measured on real images
    # (web / noisy / partial, 3 seeds): +0.3 / +1.3 / +0.5, while on the synthetic worlds' new classes it cost the
    # early-stopped model 0.1-0.5, so only the weights for the classes trained on have it
    seen_uni_projection: bool = True
    precision: str = "auto"  # "bf16" (autocast, fp32 weights) | "fp32" | "auto": see `use_bf16`
    out_dir: str | None = None  # per-epoch checkpoints (last/, best/), resumable
    on_mismatch: str = "error"  # out_dir holds a run on other inputs or settings: "error" | "restart" (train afresh)
    cache_dir: str | None = None  # neighbour cache; default out_dir/cache, else $RECO_CACHE_DIR (`cache_root`)
    cache_keep: int = 8  # neighbour caches kept in the cache directory (the least recently used are pruned)
    progress: bool = True


DEFAULT_LR = {"relevance": 2e-3, "transformer": 3e-4, "mean": 0.0}  # measured: the transformer degrades above 3e-4
_NOT_IN_DIGEST = ("progress", "out_dir", "on_mismatch", "cache_dir", "cache_keep", "device")


def use_bf16(precision: str, device: str, dim: int = 512) -> bool:
    """Whether to train under bf16 autocast: asked for, or "auto" for models wide enough to gain
    (dim >= 256: CLIP's 512-d trains ~1.5x faster; at 64-d the casts cost more than they save) on
    hardware with fast bf16 matmuls (CUDA with bf16 support; CPUs with AMX or AVX512-BF16)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if dim < 256:
        return False
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: not on the temperature, LayerNorm gains, biases or the
    type/rank embeddings (CLIP's practice; decaying the temperature pulls it towards 1)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith("_emb") else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    try:  # the fused kernel (torch >= 2.4 on CPU) is ~10% faster per step; same state dict
        return torch.optim.AdamW(groups, lr=cfg.lr or DEFAULT_LR[cfg.aggregator], fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr or DEFAULT_LR[cfg.aggregator])


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return h.hexdigest()[:20]


def cache_root(cfg: TrainConfig) -> Path:
    """Where neighbour caches live: `cache_dir`, else beside the run (`out_dir/cache`), else the package's one
    cache directory (`ingest.cache_root`: $RECO_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /reco_qdrant)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir) / "neighbours"
    if cfg.out_dir:
        return Path(cfg.out_dir) / "cache" / "neighbours"
    if os.environ.get("RECO_CACHE") and not os.environ.get("RECO_CACHE_DIR"):
        warnings.warn("$RECO_CACHE is deprecated and will be ignored in the next release: set $RECO_CACHE_DIR, the "
                      "one cache directory for embeddings and neighbours", DeprecationWarning, stacklevel=3)
        return Path(os.environ["RECO_CACHE"]) / "neighbours"
    return package_cache_root() / "neighbours"


def _prune_cache(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used caches in `root`. Another process may prune (or write) the
    same folder meanwhile: a cache that is gone by the time it is looked at is simply not counted."""
    stamped = []
    for p in root.glob("*.vectors.npy"):
        try:
            stamped.append((p.stat().st_mtime, p))
        except FileNotFoundError:  # removed by a concurrent prune between the listing and the stat
            continue
    entries = [p for _, p in sorted(stamped, key=lambda e: e[0], reverse=True)]
    for old in entries[max(keep, 0):]:
        key = old.name.removesuffix(".vectors.npy")
        for p in (old, root / f"{key}.keys.npy", root / f"{key}.mask.npy"):
            p.unlink(missing_ok=True)


def neighbour_cache(memory: Memory, queries: np.ndarray, query_modality: str, cfg: TrainConfig,
                    ids: list[str | None] | None, class_out: np.ndarray | None = None,
                    columns: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query [N, d]: neighbour vectors [N, k, d] of the fused modality, their keys [N, k, d]
    (vectors of the searched modality; float16, memory-mapped) and mask [N, k]. Cached on disk under a
    key of the memory's id and write version (it changes with every upsert and delete), the mode and
    the queries.

    With `class_out` (labels [N] of the queries, whose `ids` are memory points), each query retrieves as
    if its class were absent from the memory: every point of its class is excluded.

    `columns`: gather the hits' vectors from `Memory.vector_columns` (one scroll of the memory, then
    id-only searches) instead of receiving them with every hit; default: when the queries' hits outnumber
    the memory's points."""
    root = cache_root(cfg)
    key = _digest(memory.uid, memory.write_version, cfg.k, cfg.search, cfg.fusion, query_modality,
                  cfg.self_exclusion, cfg.dedup_threshold, cfg.hnsw_ef, ids, queries, class_out)
    exclude = ids if cfg.self_exclusion else None
    if class_out is not None:
        members = class_members(ids, class_out)
        exclude = [members[c] for c in class_out]
    paths = {p: root / f"{key}.{p}.npy" for p in ("vectors", "keys", "mask")}
    searched, returned = mode_modalities(query_modality, cfg.search, cfg.fusion)
    if all(p.exists() for p in paths.values()):
        try:
            os.utime(paths["vectors"])  # recently used: pruned last
            return (np.load(paths["vectors"], mmap_mode="r"), np.load(paths["keys"], mmap_mode="r"),
                    np.load(paths["mask"]))
        except FileNotFoundError:  # pruned by another process meanwhile: computed again below
            pass
    root.mkdir(parents=True, exist_ok=True)
    n, d = queries.shape
    tmp = {p: root / f"{key}.{os.getpid()}.{p}.tmp.npy" for p in ("vectors", "keys")}
    tmp_mask = root / f"{key}.{os.getpid()}.mask.tmp.npy"
    try:  # a failure or Ctrl-C leaves none of this run's temporary files behind
        vecs, keys = (np.lib.format.open_memmap(tmp[p], mode="w+", dtype=np.float16, shape=(n, cfg.k, d))
                      for p in ("vectors", "keys"))
        mask = np.zeros((n, cfg.k), bool)
        if columns is None:
            columns = n * cfg.k > memory.count()
        columns = memory.vector_columns(root / "columns", cfg.progress) if columns else None
        step = 1024
        with progress_bar(f"neighbours ({query_modality} queries)", n, cfg.progress) as advance:
            for s in range(0, n, step):
                e = min(n, s + step)
                nb = retrieve(memory, queries[s:e], query_modality, cfg.k, cfg.search, cfg.fusion,
                              exclude_ids=exclude[s:e] if exclude is not None else None,
                              dedup_threshold=cfg.dedup_threshold if cfg.self_exclusion else None,
                              with_payload=False, with_keys=columns is None, with_vectors=columns is None,
                              hnsw_ef=cfg.hnsw_ef)
                if columns is None:
                    vecs[s:e], keys[s:e] = nb.vectors, nb.keys
                else:
                    vecs[s:e], keys[s:e] = columns.gather(nb.ids, returned), columns.gather(nb.ids, searched)
                mask[s:e] = nb.mask
                advance(e - s)
        for a in (vecs, keys):
            a.flush()
        del vecs, keys
        np.save(tmp_mask, mask)  # beside, then renamed: a reader never sees part of a mask under its name
        durable.replace(tmp_mask, paths["mask"])
        # opened before pruning: a concurrent prune may unlink the names, the maps stay valid (POSIX keeps the data)
        vecs, keys = np.load(tmp["vectors"], mmap_mode="r"), np.load(tmp["keys"], mmap_mode="r")
        durable.replace(tmp["keys"], paths["keys"])
        durable.replace(tmp["vectors"], paths["vectors"])  # last: the cache counts as present once this exists
    except BaseException:
        for p in (*tmp.values(), tmp_mask):
            p.unlink(missing_ok=True)
        raise
    _prune_cache(root, cfg.cache_keep)
    return vecs, keys, mask


def class_members(ids: list[str], labels: np.ndarray) -> dict[int, frozenset[str]]:
    """Class -> the memory point ids of its pairs."""
    return {int(c): frozenset(ids[i] for i in np.flatnonzero(labels == c)) for c in np.unique(labels)}


def _pick(rows: Any, a: Any, b: Any) -> list:
    """Neighbour arrays (vectors, keys, mask) taken from `a` where rows [N] is True, else from `b`
    (numpy arrays or torch tensors, as given)."""
    where = torch.where if isinstance(rows, torch.Tensor) else np.where
    return [where(rows.reshape(-1, *[1] * (x.ndim - 1)), x, y) for x, y in zip(a, b)]


def _tensors(nb: tuple, idx: np.ndarray, device: Any) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(a[idx])).to(device) for a in nb]


def search_scores(q: np.ndarray | torch.Tensor, keys: Any, mask: Any) -> Any:
    """Cosine of each query [B, d] with its neighbours' keys [B, k, d] (their search scores); -inf where
    mask [B, k] is False. numpy or torch, as given."""
    if isinstance(q, torch.Tensor):
        return torch.einsum("bd,bkd->bk", q, keys).masked_fill(~mask, float("-inf"))
    s = np.einsum("bd,bkd->bk", q, np.asarray(keys, np.float32))
    return np.where(mask, s, -np.inf).astype(np.float32)


class _Prompts:
    """One embedding per class [C, d] (its prompt, or without prompts its captions' mean) and its neighbours.

    With `exclusion`, each prompt keeps 2k neighbours, so that the images being scored can be left out of
    their prompts' neighbours (`neighbours(exclude=...)`): a training image is a point of the memory and
    would otherwise meet itself among the images its own class name retrieved (measured on real images:
    12-31% of them do, at k=10), which a test image never does."""

    def __init__(self, memory: Memory, cfg: TrainConfig, classes: np.ndarray, class_embeddings: np.ndarray | None,
                 txt: np.ndarray, labels: np.ndarray, members: dict[int, frozenset[str]] | None = None,
                 exclusion: bool = False) -> None:
        emb = (class_embeddings[classes] if class_embeddings is not None else
               np.stack([txt[labels == c].mean(0) for c in classes]))
        self.classes, self.k = classes, cfg.k
        self.emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
        depth = 2 * cfg.k if exclusion else cfg.k

        def search(exclude: list | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            nb = retrieve(memory, self.emb, "text", depth, cfg.search, cfg.fusion, with_keys=True, with_payload=False,
                          exclude_ids=exclude)
            return nb.vectors, nb.keys, nb.ids

        self.nb = search(None)
        # as if each class were absent from the memory (its members excluded)
        self.nb_out = search([members[int(c)] for c in classes]) if members is not None else None

    def neighbours(self, absent: np.ndarray | None = None, exclude: Any = None) -> tuple:
        """(vectors [C, k, d], keys [C, k, d], mask [C, k]): each class's first k neighbours, as if absent from
        the memory where `absent` [C] is True, leaving out the point ids in `exclude`."""
        vectors, keys, ids = self.nb
        if absent is not None and self.nb_out is not None and np.any(absent):
            vectors, keys, ids = _pick(np.asarray(absent), self.nb_out, self.nb)
        keep = ids != ""
        if exclude is not None and len(exclude):
            keep &= ~np.isin(ids, list(exclude))
        order = np.argsort(~keep, axis=1, kind="stable")[:, : self.k]  # kept ones first, in rank order
        return (np.take_along_axis(vectors, order[..., None], 1), np.take_along_axis(keys, order[..., None], 1),
                np.take_along_axis(keep, order, 1))

    def refined(self, model: FusionModel, absent: np.ndarray | None = None, turn: Any = None,
                exclude: Any = None) -> torch.Tensor:
        """The class embeddings refined by the model, a differentiable tensor [C, d], from `neighbours(absent,
        exclude)`; `turn` misaligns the text modality (see `_Misalign`)."""
        q = torch.from_numpy(self.emb).to(model.device)
        nb = [torch.from_numpy(np.ascontiguousarray(a)).to(model.device) for a in self.neighbours(absent, exclude)]
        if turn is not None:
            q, nb = turn.turn(q), turn.neighbours(nb, "text")
        return _refine_batch(model, "text", q, *nb, 0.0)


class _Misalign:
    """An encoder that does not align the modalities, simulated: every text vector of a training step
    (queries, neighbours, prompts) is turned by one random orthogonal map, mixed with the identity by a
    random angle. Image-image cosines are kept and text-text ones nearly (measured: within 0.06 at 256-d), so
    the search scores hold, while image-text ones are scrambled: the case of classes whose names the encoder
    never learned, where only retrieval (an image's neighbours' captions, a name's captions' images) tells
    the classes apart. Measured on real images: with a quarter of the steps so turned, the model does as
    well or better on every regime (README "Method")."""

    def __init__(self, cfg: TrainConfig, dim: int, device: Any) -> None:
        self.cfg = cfg
        rot, _ = torch.linalg.qr(torch.randn(dim, dim))
        angle = float(torch.rand(())) * math.pi / 2
        self.map = (math.cos(angle) * torch.eye(dim) + math.sin(angle) * rot).to(device)

    def turn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.float() @ self.map, dim=-1)

    def neighbours(self, nb: list | None, query_modality: str) -> list | None:
        """(vectors, keys, mask) of `query_modality` queries with their text vectors turned."""
        if nb is None:
            return None
        searched, returned = mode_modalities(query_modality, self.cfg.search, self.cfg.fusion)
        vectors, keys, mask = nb
        return [self.turn(vectors) if returned == "text" else vectors,
                self.turn(keys) if searched == "text" else keys, mask]


class _Validation:
    """Zero-shot accuracy of held-out classes' images among *all* classes' prompts (as evaluation scores
    them), or, with neither labels nor pseudo-classes, image->text recall@1 on held-out pairs. `img_nb` and
    `target_nb` are the neighbour arrays (vectors, keys, mask) of the images and the targets; with `prompts`,
    the targets are its classes, as if absent where `absent` [C] is True, and each chunk of images is scored
    against prompts whose neighbours leave those images (`ids`) out. With `covered_nb`, also scored with every
    class present, and the two scores averaged."""

    CHUNK = 64

    def __init__(self, img: np.ndarray, img_nb: tuple, answer: np.ndarray, targets: np.ndarray | None = None,
                 target_nb: tuple | None = None, prompts: _Prompts | None = None, absent: np.ndarray | None = None,
                 ids: np.ndarray | None = None, seed: int = 0, covered_nb: tuple | None = None) -> None:
        self.img, self.img_nb, self.answer, self.covered_nb = img, img_nb, answer, covered_nb
        self.targets, self.target_nb, self.prompts, self.absent, self.ids = targets, target_nb, prompts, absent, ids
        self.order = np.random.default_rng(seed).permutation(len(img))  # chunks mix classes

    def score(self, model: FusionModel | None) -> float:
        """With `covered_nb` (the images' neighbours with every class present), the mean of the scores with the
        absent classes and with none: a memory may cover the classes asked about, or not."""
        if self.covered_nb is None or self.absent is None:
            return self._score(model, self.img_nb, self.absent)
        return 0.5 * (self._score(model, self.img_nb, self.absent) + self._score(model, self.covered_nb, None))

    def _score(self, model: FusionModel | None, img_nb: tuple, absent: np.ndarray | None) -> float:
        def refine(mod: str, q: np.ndarray, nb: tuple) -> np.ndarray:
            if model is None:
                return np.asarray(q, np.float32)
            return model.refine_numpy(mod, q, nb[0], nb[2], scores=search_scores(q, nb[1], nb[2]), keys=nb[1])[0]

        v = refine("image", self.img, img_nb)
        if self.prompts is None:
            pred = (v @ refine("text", self.targets, self.target_nb).T).argmax(1)
            return float((pred == self.answer).mean())
        chunks = [self.order] if self.ids is None else np.array_split(self.order, -(-len(v) // self.CHUNK))
        pred = np.empty(len(v), np.int64)
        for rows in chunks:
            nb = self.prompts.neighbours(absent, None if self.ids is None else self.ids[rows])
            pred[rows] = (v[rows] @ refine("text", self.prompts.emb, nb).T).argmax(1)
        return float((pred == self.answer).mean())


def _split(n: int, labels: np.ndarray | None, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [n] mask of validation items: whole classes when labels are given."""
    if frac <= 0:
        return np.zeros(n, bool)
    if labels is not None:
        classes = np.unique(labels)
        if len(classes) < 4:
            raise ValueError(f"{len(classes)} classes: too few to hold some out for validation "
                             "(set val_fraction=0 to train without early stopping)")
        held = rng.choice(classes, max(2, int(round(len(classes) * frac))), replace=False)
        return np.isin(labels, held)
    return rng.random(n) < frac


def _pseudo_labels(img: np.ndarray, txt: np.ndarray, cfg: TrainConfig, rng: np.random.Generator
                   ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Without labels: (training clusters [N], validation clusters [N], validation rows [N] bool), or None for
    the first when the training pairs fall into fewer than 8 clusters.

    Validation holds out clusters of the *images*: visual concepts whose captions carry the memory's own
    noise. Training clusters the remaining *pairs* (image and text side by side), so that hiding a cluster
    hides the captions that name its concept along with its images, as a memory lacking a class does; pair
    clusters are not used for validation, because they gather captions that agree with their images and so
    overrate, on noisy captions, what training does for real prompts (docs/experiments.md). Training
    clusters and their medoid prompts come from training rows only; validation rows get classes of their own,
    so no validation caption serves as a training prompt."""
    v_labels = pseudo_classes(img, txt, cfg.pseudo_class_size, cfg.seed, on="image")
    if v_labels.max() + 1 < 8:
        return None, v_labels, np.zeros(len(img), bool)
    is_val = _split(len(img), v_labels, cfg.val_fraction, rng)
    tr = np.flatnonzero(~is_val)
    labels = np.empty(len(img), np.int64)
    labels[tr] = pseudo_classes(img[tr], txt[tr], cfg.pseudo_class_size, cfg.seed)
    if labels[tr].max() + 1 < 8:
        return None, v_labels, is_val
    labels[is_val] = labels[tr].max() + 1 + np.unique(v_labels[is_val], return_inverse=True)[1]
    return labels, v_labels, is_val


def train_fusion(
    memory: Memory,
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    class_embeddings: np.ndarray | None = None,
    ids: list[str] | None = None,
    encoder_id: str | None = None,
    config: TrainConfig | None = None,
    **overrides: Any,
) -> FusionModel:
    """Train phi_img and phi_txt contrastively on image-text pairs, encoders frozen.

    Args:
        memory: the memory neighbours are retrieved from.
        image_embeddings, text_embeddings: [N, d] pairs from the memory's encoder.
        labels: [N] class of each pair, to validate on held-out classes; without them, k-means pseudo-classes
            (`pseudo_class_size` pairs each) stand in, given at least 8 of them.
        class_embeddings: [C, d] class-prompt embeddings indexed by label, for that validation.
        ids: [N] memory point ids of the pairs, when they are stored in the memory (self-exclusion).
        config / overrides: `TrainConfig` fields (k, epochs, lr, seed, search, fusion, aggregator, ...).
    Returns:
        The best `FusionModel` (by validation), in eval mode, with `.history` (one dict per epoch).
    """
    cfg = config or TrainConfig()
    if overrides:
        cfg = TrainConfig(**{**asdict(cfg), **overrides})
    if cfg.on_mismatch not in ("error", "restart"):
        raise ValueError(f"on_mismatch must be 'error' or 'restart', got {cfg.on_mismatch!r}")
    img, txt, labels, class_embeddings = _check_inputs(memory, image_embeddings, text_embeddings, labels,
                                                       class_embeddings, ids)
    if memory.count() < cfg.k:
        raise ValueError(f"the memory holds {memory.count()} points, fewer than k={cfg.k}: ingest data first")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    run = _run_digest(memory, cfg, img, txt, labels, class_embeddings, ids)
    learns = cfg.aggregator != "mean" and cfg.epochs > 0
    rng = np.random.default_rng(cfg.seed)
    pseudo = labels is None and learns and cfg.pseudo_class_size > 0 and len(img) >= 8 * cfg.pseudo_class_size
    v_labels = is_val = None
    if pseudo:
        labels, v_labels, is_val = _pseudo_labels(img, txt, cfg, rng)
        if labels is None:  # near-duplicate pairs collapse into few clusters: validate on pairs instead
            pseudo = False
        else:
            class_embeddings = txt[medoids(txt, labels)]  # one caption, as a prompt is one sentence
    resumable = out is not None and _prepare_out_dir(out, run, cfg.on_mismatch)
    device = cfg.device or default_device()
    torch.manual_seed(cfg.seed)
    enc_id = encoder_id or (memory.encoder_record or {}).get("id")
    model = FusionModel(FusionConfig(dim=img.shape[1], k=cfg.k, n_heads=cfg.n_heads, dropout=cfg.dropout,
                                     token_dropout=cfg.token_dropout, aggregator=cfg.aggregator,
                                     projection=cfg.projection, uni_term=cfg.uni_term,
                                     uni_projection=cfg.uni_projection,
                                     search=cfg.search, fusion=cfg.fusion, encoder_id=enc_id)).to(device)

    if learns and class_embeddings is not None and not pseudo:  # how well the encoder aligns the classes learned from
        seen = class_embeddings[np.unique(labels)]
        nb = retrieve(memory, seen, "text", cfg.k, cfg.search, cfg.fusion, with_payload=False)
        model.cfg.alignment = round(cross_alignment(seen, nb.vectors, nb.mask), 4)
    img_nb = neighbour_cache(memory, img, "image", cfg, ids)
    txt_nb = neighbour_cache(memory, txt, "text", cfg, ids)
    # Coverage: a memory never holds every class a user asks about. With labels and the pairs' point ids, a
    # share of classes is treated as absent (every point of the class excluded from its retrieval), in
    # training and in validation, so the model learns, and is selected for, knowing when retrieval misleads.
    class_out = learns and labels is not None and ids is not None and cfg.uncovered_fraction > 0
    members = class_members(ids, labels) if class_out else None
    img_out = neighbour_cache(memory, img, "image", cfg, ids, class_out=labels) if class_out else None
    txt_out = neighbour_cache(memory, txt, "text", cfg, ids, class_out=labels) if class_out else None
    classes = np.unique(labels) if labels is not None else None
    # What validation scores against: the held-out classes, or without labels held-out clusters of the images
    # (see `_pseudo_labels`), each with its medoid caption as prompt
    if not pseudo:
        v_labels, is_val = labels, _split(len(img), labels, cfg.val_fraction, rng)
    tr = np.flatnonzero(~is_val)
    va = np.flatnonzero(is_val)
    sub = lambda nb: tuple(a[va] for a in nb)  # noqa: E731
    # the held-out images' neighbours as if their class were absent ([len(va), k, ...])
    v_classes, v_emb, v_members = classes, class_embeddings, members
    v_img_out = sub(img_out) if img_out is not None and not pseudo else None
    if pseudo:
        v_classes, v_emb = np.unique(v_labels), txt[medoids(txt, v_labels)]
        if class_out:  # whole image clusters are held out, so their members are all among the held-out rows
            v_members = class_members(ids, v_labels)
            v_img_out = neighbour_cache(memory, img[va], "image", cfg, [ids[i] for i in va], class_out=v_labels[va])
    val = None
    if len(va):
        if labels is None:
            val = _Validation(img[va], sub(img_nb), np.arange(len(va)), txt[va], sub(txt_nb))
        else:
            prompts = _Prompts(memory, cfg, v_classes, v_emb, txt, v_labels, v_members, exclusion=ids is not None)
            val_nb, absent = sub(img_nb), None
            if class_out:
                held = np.unique(v_labels[va])
                out_classes = rng.choice(held, int(round(len(held) * cfg.uncovered_fraction)), replace=False)
                absent = np.isin(v_classes, out_classes)
                val_nb = _pick(np.isin(v_labels[va], out_classes), v_img_out, val_nb)
            val = _Validation(img[va], val_nb, np.searchsorted(v_classes, v_labels[va]), prompts=prompts, absent=absent,
                              ids=None if ids is None else np.asarray(ids)[va], seed=cfg.seed,
                              covered_nb=sub(img_nb) if pseudo else None)
    train_prompts = None
    if learns and labels is not None and class_embeddings is not None and cfg.class_loss > 0:
        train_prompts = _Prompts(memory, cfg, np.unique(labels[tr]), class_embeddings, txt, labels, members,
                                 exclusion=ids is not None)
    history: list[dict[str, float]] = []
    baseline = val.score(None) if val else float("nan")
    if not learns:
        model.history = [{"epoch": 0, "val": val.score(model) if val else float("nan"),
                          "val_baseline": baseline}]
        model.best_epoch = 0
        model.pseudo_classes = 0
        return model.eval()

    steps_per_epoch = max(1, math.ceil(len(tr) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(total * cfg.warmup_fraction))
    opt = _adamw(model, cfg)
    bf16 = use_bf16(cfg.precision, str(device), img.shape[1])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    start, best, best_epoch, bad = 0, (val.score(model) if val else -math.inf), 0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history.append({"epoch": 0, "loss": float("nan"), "val": best, "val_baseline": baseline, "seconds": 0.0})
    if resumable:
        start, best, best_epoch, bad, history = _resume(out, model, opt, sched, device)
        # a finished run's best/ holds `seen` too
        best_state = {k: v.to(device) for k, v in FusionModel.from_pretrained(out / "best").own_state_dict().items()}

    for epoch in range(start + 1, cfg.epochs + 1):
        if val is not None and bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        model.train()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout/shuffle depend only on (seed, epoch)
        order = tr[torch.randperm(len(tr)).numpy()]
        losses = []
        with progress_bar(f"epoch {epoch}/{cfg.epochs}", len(order), cfg.progress) as advance:
            for s in range(0, len(order), cfg.batch_size):
                idx = np.sort(order[s : s + cfg.batch_size])
                if len(idx) < 2:
                    continue
                q_i, q_t = (torch.from_numpy(a[idx]).to(device) for a in (img, txt))
                nb_i, nb_t = _tensors(img_nb, idx, device), _tensors(txt_nb, idx, device)
                absent = None
                if class_out:  # this step's absent classes: their queries retrieve without their class
                    absent = torch.rand(len(classes)) < cfg.uncovered_fraction
                    rows = absent[np.searchsorted(classes, labels[idx])].to(device)
                    nb_i = _pick(rows, _tensors(img_out, idx, device), nb_i)
                    nb_t = _pick(rows, _tensors(txt_out, idx, device), nb_t)
                turn = _Misalign(cfg, img.shape[1], device) if torch.rand(()) < cfg.misaligned_fraction else None
                if turn is not None:
                    q_t = turn.turn(q_t)
                    nb_i, nb_t = turn.neighbours(nb_i, "image"), turn.neighbours(nb_t, "text")
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    v_ref = _refine_batch(model, "image", q_i, *nb_i, cfg.swap_fraction)
                    t_ref = _refine_batch(model, "text", q_t, *nb_t, cfg.swap_fraction)
                loss = reco_loss(v_ref.float(), t_ref.float(), q_i, q_t, model.logit_scale)
                if train_prompts is not None:  # the zero-shot task itself, on the training classes
                    target = torch.from_numpy(np.searchsorted(train_prompts.classes, labels[idx])).to(device)
                    cls_absent = (None if absent is None else
                                  absent.numpy()[np.searchsorted(classes, train_prompts.classes)])
                    batch_ids = None if ids is None else [ids[i] for i in idx]  # never scored against itself
                    logits = (model.logit_scale.exp().clamp(max=100.0) * v_ref.float()
                              @ train_prompts.refined(model, cls_absent, turn, batch_ids).T)
                    loss = loss + cfg.class_loss * torch.nn.functional.cross_entropy(logits, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                advance(len(idx))
        score = val.score(model) if val else -float(np.mean(losses))
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val": score, "val_baseline": baseline,
                        "seconds": time.perf_counter() - t0})
        if out:
            _checkpoint(out, model, opt, sched, epoch, best, best_epoch, bad, history, best_state)
    model.load_state_dict(best_state)
    if cfg.seen_model and train_prompts is not None and val is not None and not pseudo:
        # the weights for the classes trained on: every labelled pair, no class held out, the full schedule; with no
        # held-out class to choose by, its epoch of lowest training loss is kept (resumable under out_dir/seen)
        seen = train_fusion(memory, img, txt, labels=labels, class_embeddings=class_embeddings, ids=ids,
                            encoder_id=encoder_id, config=cfg, val_fraction=0.0, seen_model=False,
                            uni_projection=cfg.seen_uni_projection and cfg.uni_term,
                            out_dir=str(out / "seen") if out else None,
                            cache_dir=cfg.cache_dir or (str(out / "cache") if out else None))
        model = model.with_seen(seen, class_embeddings[classes])
        if out:
            _save(out, "best", model)
    model.history = history
    model.best_epoch = best_epoch
    model.pseudo_classes = int(labels.max()) + 1 if pseudo else 0  # clusters that stood in for classes
    return model.eval()


def _refine_batch(model: FusionModel, modality: str, q: torch.Tensor, vectors: torch.Tensor, keys: torch.Tensor,
                  mask: torch.Tensor, swap_fraction: float) -> torch.Tensor:
    """Refine a training batch. A share of the queries is handed another query's neighbours, scored against
    itself: a memory never covers every class, and the model must learn when retrieval has nothing to offer."""
    vectors, keys = vectors.float(), keys.float()
    if swap_fraction > 0:
        rows = torch.nonzero(torch.rand(len(q), device=q.device) < swap_fraction).flatten()
        if len(rows) > 1:
            donors = rows.roll(1)
            vectors, keys, mask = vectors.clone(), keys.clone(), mask.clone()
            vectors[rows], keys[rows], mask[rows] = vectors[donors], keys[donors], mask[donors]
    return model.refine(modality, q, vectors, mask, scores=search_scores(q, keys, mask), keys=keys)[0]


def _check_inputs(memory: Memory, image_embeddings: np.ndarray, text_embeddings: np.ndarray, labels: Any,
                  class_embeddings: Any, ids: Any) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """Validate and L2-normalise the training inputs as ingest does; refuse misaligned ones by name."""
    img = validate_embeddings(image_embeddings, "training image embeddings", memory.dim, "train_fusion")
    txt = validate_embeddings(text_embeddings, "training text embeddings", img.shape[1], "train_fusion")
    n = len(img)
    if len(txt) != n:
        raise ValueError(f"train_fusion: {n} image embeddings but {len(txt)} text embeddings; expected pairs")
    if ids is not None and len(ids) != n:
        raise ValueError(f"train_fusion: {len(ids)} ids for {n} pairs; ids[i] must be the point id of pair i")
    if ids is not None and n:
        sample = [str(ids[i]) for i in np.unique(np.linspace(0, n - 1, min(n, 1000)).astype(int))]
        if not memory.existing_ids(sample):
            raise ValueError(f"train_fusion: none of {len(sample)} ids checked (e.g. {sample[0]!r}) is a point of the "
                             "memory, so no pair's own point would be excluded from its neighbours; ids must be "
                             "point_id(source, key) with the source name the pairs were ingested under (by default "
                             "the folder's full path)")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise ValueError(f"train_fusion: {len(labels)} labels for {n} pairs")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"train_fusion: labels must be integer class indices, got dtype {labels.dtype}")
    if class_embeddings is not None:
        if labels is None:
            raise ValueError("train_fusion: class_embeddings are indexed by labels; pass labels too")
        class_embeddings = validate_embeddings(class_embeddings, "class embeddings", img.shape[1], "train_fusion")
        if labels.min() < 0 or labels.max() >= len(class_embeddings):
            raise ValueError(f"train_fusion: labels run from {labels.min()} to {labels.max()}, but there are "
                             f"{len(class_embeddings)} class embeddings: label c must be the 0-based row of its "
                             "class in class_embeddings")
    return img, txt, labels, class_embeddings


def _run_digest(memory: Memory, cfg: TrainConfig, img: np.ndarray, txt: np.ndarray, labels: Any,
                class_embeddings: Any, ids: Any) -> dict[str, str]:
    """Everything a training result depends on, digested part by part (so a mismatch can be named)."""
    return {"training pairs": _digest(img, txt), "labels": _digest(labels),
            "class embeddings": _digest(class_embeddings), "ids": _digest(ids),
            "memory (id and write version)": f"{memory.uid}@{memory.write_version}",
            # without labels, how pseudo-classes are made (a run made otherwise does not resume)
            **({"pseudo-classes": "pairs for training, images for validation"} if labels is None else {}),
            **{f"setting {k}": repr(v) for k, v in asdict(cfg).items() if k not in _NOT_IN_DIGEST
               and not (k == "pseudo_class_size" and labels is not None)}}  # unused with labels: old runs resume


RUN_FILE = "run.json"


def _prepare_out_dir(out: Path, run: dict[str, str], on_mismatch: str) -> bool:
    """Recover an interrupted checkpoint rotation, compare the run in `out` with this one, and say
    whether to resume. A run on other inputs is refused, or cleared when the user chose "restart"."""
    _recover(out)
    existing = any((out / p).exists() for p in ("last", "best", RUN_FILE))
    if existing:
        try:
            before = json.loads((out / RUN_FILE).read_text())
        except (OSError, ValueError):
            before = {}
        changed = [k for k in run if before.get(k) != run[k]] if before else ["unknown (no run.json: older version)"]
        if changed and on_mismatch == "error":
            raise ValueError(f"{out} holds a training run on other inputs or settings (changed: {', '.join(changed)}); "
                             "resume only continues the same run: use another output directory, or "
                             "on_mismatch='restart' (reco train --restart) to train afresh there")
        if changed:
            for p in ("last", "best"):
                shutil.rmtree(out / p, ignore_errors=True)
        elif (out / "last" / "trainer_state.pt").exists():
            return True
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, out / RUN_FILE)
    return False


def _recover(out: Path) -> None:
    """Finish a checkpoint rotation that a crash interrupted: a final directory renamed away but not yet
    replaced is restored from its `.old` copy; leftover `.old`/`.tmp` directories are removed."""
    for name in ("best", "last"):
        final, old, tmp = out / name, out / f".{name}.old", out / f".{name}.tmp"
        if not final.exists() and old.exists():
            os.replace(old, final)
        for leftover in (old, tmp):
            if leftover.exists():
                shutil.rmtree(leftover)


def _checkpoint(out: Path, model: FusionModel, opt: Any, sched: Any, epoch: int, best: float, best_epoch: int,
                bad: int, history: list, best_state: dict) -> None:
    """last/ (weights + optimiser state, to resume) and best/ (the model to use). Written then renamed."""
    best_model = FusionModel(model.cfg)
    best_model.load_state_dict({k: v.cpu() for k, v in best_state.items()})
    _save(out, "best", best_model)
    _save(out, "last", model, {"epoch": epoch, "best": best, "best_epoch": best_epoch, "bad": bad,
                               "history_json": json.dumps(history), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict()})


def _save(out: Path, name: str, model: FusionModel, trainer_state: dict | None = None) -> None:
    """Write `model` (and the trainer state) to out/name: into a temporary directory, then renamed."""
    tmp, old = out / f".{name}.tmp", out / f".{name}.old"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    model.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    durable.fsync_path(tmp)  # whole on disk before the renames publish it
    final = out / name
    if final.exists():  # a crash between these renames is undone by `_recover`
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    durable.fsync_dir(out)


def _resume(out: Path, model: FusionModel, opt: Any, sched: Any, device: str) -> tuple:
    last = FusionModel.from_pretrained(out / "last", device=device)
    if last.cfg != model.cfg:
        raise ValueError(f"{out / 'last'}: checkpoint was trained with {last.cfg}, not {model.cfg}")
    model.load_state_dict(last.state_dict())
    st = torch.load(out / "last" / "trainer_state.pt", map_location=device, weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return st["epoch"], st["best"], st["best_epoch"], st["bad"], json.loads(st["history_json"])
