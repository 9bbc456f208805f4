"""Training the fusion model: a neighbour cache built once, then a contrastive loop with early stopping.

Validation is split by class: the fusion must help on classes it never saw, so the best epoch is
chosen by zero-shot accuracy on held-out classes and kept; training stops when it stops improving.
Without labels (RECO's own setting: unlabelled web pairs), the pairs are clustered into pseudo-classes
(`clusters.py`), each with its medoid caption as a prompt, and those stand in for classes: coverage
training (a share of them hidden from the memory) and the class loss run on clusters of the pairs;
validation runs on held-out clusters of the images, scored with and without the hidden ones. With labels
and class embeddings, a second run on every labelled pair, no class held out, for the whole schedule, gives
weights adapted to the classes trained on (`adapt_fusion`; `FusionModel.adapted`, used only with
`RecoClassifier(weights="adapted")`).

The parts live beside this loop: `pairs.py` (classes, split, neighbours), `neighbour_cache.py`, `augment.py`,
`prompts.py`, `validation.py` and `checkpoints.py`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._deprecated import renamed_attribute, renamed_fields, renamed_property
from .augment import _misaligned, _refine_batch, _uncover
from .checkpoints import RENAMED_SETTINGS, _checkpoint, _prepare_out_dir, _resume, _run_digest, _save
from .encoders import default_device
from .fusion import FusionConfig, FusionModel, cross_alignment
from .loss import reco_loss
from .memory import Memory, validate_embeddings
from .neighbors import retrieve
from .neighbour_cache import _tensors
from .neighbour_cache import cache_root as cache_root  # these four also from here: scripts import them so
from .neighbour_cache import class_members as class_members
from .neighbour_cache import neighbour_cache as neighbour_cache
from .neighbour_cache import search_scores as search_scores
from .pairs import _find_neighbours, _Pairs, _prepare_pairs
from .progress import progress_bar
from .prompts import _Prompts
from .validation import _Validation, _validation


@renamed_fields(RENAMED_SETTINGS)
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
    # schedule, for the classes trained on (`adapt_fusion`, `FusionModel.adapted`); early stopping picks the one for
    # other classes
    adapted_model: bool = True
    # that model also learns the map on the searched modality's mean (`uni_projection`): capacity that helps the
    # classes trained on and costs new ones, so only the weights for the classes trained on have it
    # (docs/experiments.md)
    adapted_uni_projection: bool = True
    precision: str = "auto"  # "bf16" (autocast, fp32 weights) | "fp32" | "auto": see `use_bf16`
    out_dir: str | None = None  # per-epoch checkpoints (last/, best/), resumable
    on_mismatch: str = "error"  # out_dir holds a run on other inputs or settings: "error" | "restart" (train afresh)
    cache_dir: str | None = None  # neighbour cache; default out_dir/cache, else $RECO_CACHE_DIR (`cache_root`)
    cache_keep: int = 8  # neighbour caches kept in the cache directory (the least recently used are pruned)
    progress: bool = True


    seen_model = renamed_property("TrainConfig", "seen_model", "adapted_model")
    seen_uni_projection = renamed_property("TrainConfig", "seen_uni_projection", "adapted_uni_projection")


# the TrainConfig fields that are the fusion model's own settings, under the same names in FusionConfig
MODEL_SETTINGS = ("k", "n_heads", "dropout", "token_dropout", "aggregator", "projection", "uni_term", "uni_projection",
                  "search", "fusion")
DEFAULT_LR = {"relevance": 2e-3, "transformer": 3e-4, "mean": 0.0}  # measured: the transformer degrades above 3e-4


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
        class_embeddings: [C, d] class-prompt embeddings indexed by label, for that validation; with labels and
            `adapted_model`, `adapt_fusion` also trains the weights for the classes trained on
            (`FusionModel.adapted`).
        ids: [N] memory point ids of the pairs, when they are stored in the memory (self-exclusion).
        config / overrides: `TrainConfig` fields (k, epochs, lr, seed, search, fusion, aggregator, ...).
    Returns:
        The best `FusionModel` (by validation), in eval mode, with `.history` (one dict per epoch).
    """
    cfg = _config(config, overrides)
    img, txt, labels, class_embeddings = _check_inputs(memory, image_embeddings, text_embeddings, labels,
                                                       class_embeddings, ids)
    if memory.count() < cfg.k:
        raise ValueError(f"the memory holds {memory.count()} points, fewer than k={cfg.k}: ingest data first")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    run = _run_digest(memory, cfg, img, txt, labels, class_embeddings, ids)
    learns = cfg.aggregator != "mean" and cfg.epochs > 0
    rng = np.random.default_rng(cfg.seed)
    p = _prepare_pairs(img, txt, labels, class_embeddings, ids, cfg, learns, rng)
    resumable = out is not None and _prepare_out_dir(out, run, cfg.on_mismatch)
    device = cfg.device or default_device()
    model = _new_model(memory, cfg, p, encoder_id, learns, device)
    _find_neighbours(memory, p, cfg, learns, rng)
    val = _validation(memory, cfg, p, rng)
    prompts = None
    if learns and p.labels is not None and p.class_embeddings is not None and cfg.class_loss > 0:
        prompts = _Prompts(memory, cfg, np.unique(p.labels[p.tr]), p.class_embeddings, txt, p.labels, p.members,
                           exclusion=ids is not None)
    baseline = val.score(None) if val else float("nan")
    if not learns:
        model.history = [{"epoch": 0, "val": val.score(model) if val else float("nan"), "val_baseline": baseline}]
        model.best_epoch, model.pseudo_classes = 0, 0
        return model.eval()
    best_state, best_epoch, history = _fit(model, p, val, prompts, cfg, device, out, resumable, baseline)
    model.load_state_dict(best_state)
    if cfg.adapted_model and prompts is not None and val is not None and not p.pseudo:
        adapted = adapt_fusion(memory, img, txt, labels=labels, class_embeddings=class_embeddings, ids=ids,
                               encoder_id=encoder_id, config=cfg)
        model = model.with_adapted(adapted, class_embeddings[p.classes])
        if out:
            _save(out, "best", model)
    model.history, model.best_epoch = history, best_epoch
    model.pseudo_classes = int(p.labels.max()) + 1 if p.pseudo else 0  # clusters that stood in for classes
    return model.eval()


def adapt_fusion(
    memory: Memory,
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    *,
    labels: np.ndarray,
    class_embeddings: np.ndarray,
    ids: list[str] | None = None,
    encoder_id: str | None = None,
    config: TrainConfig | None = None,
    **overrides: Any,
) -> FusionModel:
    """The weights for the classes trained on (`FusionModel.adapted`, used by `RecoClassifier(weights="adapted")`):
    trained on every labelled pair, no class held out, for the whole schedule; with no held-out class to choose
    by, the epoch of lowest training loss is kept. Arguments as `train_fusion`'s, which calls this (resumable under
    out_dir/seen) when given labels and class embeddings with `adapted_model` set; attach the result to a model
    with `FusionModel.with_adapted`."""
    cfg = _config(config, overrides)
    out = Path(cfg.out_dir) if cfg.out_dir else None  # its run goes in out/seen (named so before the rename), so
    # that it never shares, or restarts over, the run of the model it is attached to
    return train_fusion(memory, image_embeddings, text_embeddings, labels=labels, class_embeddings=class_embeddings,
                        ids=ids, encoder_id=encoder_id, config=cfg, val_fraction=0.0, adapted_model=False,
                        uni_projection=cfg.adapted_uni_projection and cfg.uni_term,
                        out_dir=str(out / "seen") if out else None,
                        cache_dir=cfg.cache_dir or (str(out / "cache") if out else None))


def _config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    """`config` (default: the defaults) with `overrides` of its fields, checked."""
    cfg = config or TrainConfig()
    for old, new in RENAMED_SETTINGS.items():
        if old in overrides:
            renamed_attribute(f"setting {old}", new, stacklevel=4)  # the caller of train_fusion / adapt_fusion
            overrides[new] = overrides.pop(old)
    if overrides:
        cfg = TrainConfig(**{**asdict(cfg), **overrides})
    if cfg.on_mismatch not in ("error", "restart"):
        raise ValueError(f"on_mismatch must be 'error' or 'restart', got {cfg.on_mismatch!r}")
    return cfg


def _new_model(memory: Memory, cfg: TrainConfig, p: _Pairs, encoder_id: str | None, learns: bool,
               device: str) -> FusionModel:
    """The model at its initialisation (seeded), recording the encoder and, where it learns from classes, how
    well the encoder aligns them."""
    torch.manual_seed(cfg.seed)
    enc_id = encoder_id or (memory.encoder_record or {}).get("id")
    settings = {f: getattr(cfg, f) for f in MODEL_SETTINGS}
    model = FusionModel(FusionConfig(dim=p.img.shape[1], encoder_id=enc_id, **settings)).to(device)
    if learns and p.class_embeddings is not None and not p.pseudo:
        trained = p.class_embeddings[np.unique(p.labels)]
        nb = retrieve(memory, trained, "text", cfg.k, cfg.search, cfg.fusion, with_payload=False)
        model.cfg.alignment = round(cross_alignment(trained, nb.vectors, nb.mask), 4)
    return model


def _fit(model: FusionModel, p: _Pairs, val: _Validation | None, prompts: _Prompts | None, cfg: TrainConfig,
         device: str, out: Path | None, resumable: bool, baseline: float) -> tuple[dict, int, list[dict]]:
    """Train up to `cfg.epochs`, validating after each epoch and stopping after `patience` epochs without
    improvement; checkpointed to `out`, resumed from it. Returns (the best weights, their epoch, the history)."""
    steps_per_epoch = max(1, math.ceil(len(p.tr) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(total * cfg.warmup_fraction))
    opt = _adamw(model, cfg)
    bf16 = use_bf16(cfg.precision, str(device), p.img.shape[1])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    start, best, best_epoch, bad = 0, (val.score(model) if val else -math.inf), 0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history = [{"epoch": 0, "loss": float("nan"), "val": best, "val_baseline": baseline, "seconds": 0.0}]
    if resumable:
        start, best, best_epoch, bad, history, best_state = _resume(out, model, opt, sched, device)
    for epoch in range(start + 1, cfg.epochs + 1):
        if val is not None and bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        losses = _epoch(model, p, prompts, opt, sched, cfg, device, bf16, epoch)
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
    return best_state, best_epoch, history


def _epoch(model: FusionModel, p: _Pairs, prompts: _Prompts | None, opt: torch.optim.Optimizer, sched: Any,
           cfg: TrainConfig, device: str, bf16: bool, epoch: int) -> list[float]:
    """One pass over the training rows in batches; returns the batches' losses."""
    model.train()
    torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout/shuffle depend only on (seed, epoch)
    order = p.tr[torch.randperm(len(p.tr)).numpy()]
    losses = []
    with progress_bar(f"epoch {epoch}/{cfg.epochs}", len(order), cfg.progress) as advance:
        for s in range(0, len(order), cfg.batch_size):
            idx = np.sort(order[s : s + cfg.batch_size])
            if len(idx) < 2:
                continue
            loss = _batch_loss(model, p, idx, prompts, cfg, device, bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            advance(len(idx))
    return losses


def _batch_loss(model: FusionModel, p: _Pairs, idx: np.ndarray, prompts: _Prompts | None, cfg: TrainConfig,
                device: str, bf16: bool) -> torch.Tensor:
    """The loss of the pairs `idx` under this step's augmentations (`augment.py`): RECO's contrastive loss, plus
    with prompts the zero-shot task itself on the training classes."""
    q_i, q_t = (torch.from_numpy(a[idx]).to(device) for a in (p.img, p.txt))
    nb_i, nb_t = _tensors(p.img_nb, idx, device), _tensors(p.txt_nb, idx, device)
    absent = None
    if p.class_out:
        absent, (nb_i, nb_t) = _uncover(p.classes, p.labels[idx], cfg.uncovered_fraction,
                                        [(nb_i, _tensors(p.img_out, idx, device)),
                                         (nb_t, _tensors(p.txt_out, idx, device))], device)
    misalign = _misaligned(cfg, p.img.shape[1], device)
    if misalign is not None:
        q_t = misalign.misalign(q_t)
        nb_i, nb_t = misalign.neighbours(nb_i, "image"), misalign.neighbours(nb_t, "text")
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        v_ref = _refine_batch(model, "image", q_i, *nb_i, cfg.swap_fraction)
        t_ref = _refine_batch(model, "text", q_t, *nb_t, cfg.swap_fraction)
    loss = reco_loss(v_ref.float(), t_ref.float(), q_i, q_t, model.logit_scale)
    if prompts is None:
        return loss
    target = torch.from_numpy(np.searchsorted(prompts.classes, p.labels[idx])).to(device)
    cls_absent = None if absent is None else absent.numpy()[np.searchsorted(p.classes, prompts.classes)]
    batch_ids = None if p.ids is None else [p.ids[i] for i in idx]  # never scored against itself
    logits = (model.logit_scale.exp().clamp(max=100.0) * v_ref.float()
              @ prompts.refined(model, cls_absent, misalign, batch_ids).T)
    return loss + cfg.class_loss * torch.nn.functional.cross_entropy(logits, target)


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
