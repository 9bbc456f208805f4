"""Training the fusion model: a neighbour cache built once, then a contrastive loop with early stopping.

Validation is split by class: the fusion must help on classes it never saw, so the best epoch is
chosen by zero-shot accuracy on held-out classes (or, without labels, image->text recall@1 on
held-out pairs) and kept; training stops when it stops improving.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoders import default_device
from .fusion import FusionConfig, FusionModel
from .loss import reco_loss
from .memory import Memory
from .neighbors import retrieve
from .progress import progress_bar


@dataclass
class TrainConfig:
    k: int = 10  # neighbours per query
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # of all steps, then cosine decay
    patience: int = 4  # epochs without validation improvement before stopping
    val_fraction: float = 0.2  # of classes (or of pairs, without labels) held out for validation
    seed: int = 0
    device: str | None = None  # default: cuda when available
    self_exclusion: bool = True  # a training query never retrieves itself or its near-duplicates
    dedup_threshold: float = 0.98  # cosine in the searched modality
    search: str = "uni"
    fusion: str = "cross"
    aggregator: str = "transformer"
    n_heads: int = 8
    dropout: float = 0.1
    token_dropout: float = 0.2
    precision: str = "auto"  # "bf16" (autocast, fp32 weights) | "fp32" | "auto": see `use_bf16`
    out_dir: str | None = None  # per-epoch checkpoints (last/, best/), resumable
    cache_dir: str | None = None  # neighbour cache; default ~/.cache/reco_qdrant/neighbours
    progress: bool = True


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


def _adamw(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    try:  # the fused kernel (torch >= 2.4 on CPU) is ~10% faster per step; same state dict
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return h.hexdigest()[:20]


def neighbour_cache(memory: Memory, queries: np.ndarray, query_modality: str, cfg: TrainConfig,
                    ids: list[str | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour vectors [N, k, d] (float16, memory-mapped) and mask [N, k] for each query, cached on
    disk under a key of the memory's id and point count, the mode and the queries."""
    root = Path(cfg.cache_dir or os.environ.get("RECO_CACHE", Path.home() / ".cache" / "reco_qdrant")) / "neighbours"
    key = _digest(memory.uid, memory.count(), cfg.k, cfg.search, cfg.fusion, query_modality,
                  cfg.self_exclusion, cfg.dedup_threshold, ids, queries)
    vec_path, mask_path = root / f"{key}.vectors.npy", root / f"{key}.mask.npy"
    if vec_path.exists() and mask_path.exists():
        return np.load(vec_path, mmap_mode="r"), np.load(mask_path)
    root.mkdir(parents=True, exist_ok=True)
    n, d = queries.shape
    tmp = root / f"{key}.{os.getpid()}.tmp.npy"
    vecs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, cfg.k, d))
    mask = np.zeros((n, cfg.k), bool)
    step = 1024
    with progress_bar(f"neighbours ({query_modality} queries)", n, cfg.progress) as advance:
        for s in range(0, n, step):
            e = min(n, s + step)
            nb = retrieve(memory, queries[s:e], query_modality, cfg.k, cfg.search, cfg.fusion,
                          exclude_ids=(ids[s:e] if ids is not None else None) if cfg.self_exclusion else None,
                          dedup_threshold=cfg.dedup_threshold if cfg.self_exclusion else None)
            vecs[s:e], mask[s:e] = nb.vectors, nb.mask
            advance(e - s)
    vecs.flush()
    del vecs
    np.save(mask_path, mask)
    os.replace(tmp, vec_path)  # the cache appears whole or not at all
    return np.load(vec_path, mmap_mode="r"), mask


class _Validation:
    """Zero-shot accuracy on held-out classes, or image->text recall@1 on held-out pairs."""

    def __init__(self, memory: Memory, cfg: TrainConfig, img: np.ndarray, img_nb: tuple, labels: np.ndarray | None,
                 class_embeddings: np.ndarray | None, txt: np.ndarray, txt_nb: tuple) -> None:
        self.img, self.img_nb = img, img_nb
        if labels is not None:
            classes = np.unique(labels)
            cls_emb = (class_embeddings[classes] if class_embeddings is not None else
                       np.stack([txt[labels == c].mean(0) for c in classes]))
            cls_emb = cls_emb / np.linalg.norm(cls_emb, axis=1, keepdims=True)
            nb = retrieve(memory, cls_emb, "text", cfg.k, cfg.search, cfg.fusion)
            self.targets, self.target_nb = cls_emb.astype(np.float32), (nb.vectors, nb.mask)
            self.answer = np.searchsorted(classes, labels)
            self.metric = "val_zero_shot_top1"
        else:
            self.targets, self.target_nb = txt, txt_nb
            self.answer = np.arange(len(img))
            self.metric = "val_recall@1"

    def score(self, model: FusionModel | None) -> float:
        def refine(mod: str, q: np.ndarray, nb: tuple) -> np.ndarray:
            return np.asarray(q, np.float32) if model is None else model.refine_numpy(mod, q, nb[0], nb[1])[0]

        v = refine("image", self.img, self.img_nb)
        t = refine("text", self.targets, self.target_nb)
        pred = (v @ t.T).argmax(1)
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
        labels: [N] class of each pair, to validate on held-out classes (recommended).
        class_embeddings: [C, d] class-prompt embeddings indexed by label, for that validation.
        ids: [N] memory point ids of the pairs, when they are stored in the memory (self-exclusion).
        config / overrides: `TrainConfig` fields (k, epochs, lr, seed, search, fusion, aggregator, ...).
    Returns:
        The best `FusionModel` (by validation), in eval mode, with `.history` (one dict per epoch).
    """
    cfg = config or TrainConfig()
    if overrides:
        cfg = TrainConfig(**{**asdict(cfg), **overrides})
    img = np.ascontiguousarray(image_embeddings, np.float32)
    txt = np.ascontiguousarray(text_embeddings, np.float32)
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"image embeddings {img.shape} and text embeddings {txt.shape}: expected the same [N, d]")
    if memory.dim is not None and img.shape[1] != memory.dim:
        raise ValueError(f"training embeddings are {img.shape[1]}-d, the memory holds {memory.dim}-d vectors")
    if memory.count() < cfg.k:
        raise ValueError(f"the memory holds {memory.count()} points, fewer than k={cfg.k}: ingest data first")
    if labels is not None and len(labels) != len(img):
        raise ValueError(f"{len(labels)} labels for {len(img)} pairs")
    device = cfg.device or default_device()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    enc_id = encoder_id or (memory.encoder_record or {}).get("id")
    model = FusionModel(FusionConfig(dim=img.shape[1], k=cfg.k, n_heads=cfg.n_heads, dropout=cfg.dropout,
                                     token_dropout=cfg.token_dropout, aggregator=cfg.aggregator,
                                     search=cfg.search, fusion=cfg.fusion, encoder_id=enc_id)).to(device)

    img_nb = neighbour_cache(memory, img, "image", cfg, ids)
    txt_nb = neighbour_cache(memory, txt, "text", cfg, ids)
    is_val = _split(len(img), None if labels is None else np.asarray(labels), cfg.val_fraction, rng)
    tr = np.flatnonzero(~is_val)
    va = np.flatnonzero(is_val)
    val = None
    if len(va):
        sub = lambda nb: (nb[0][va], nb[1][va])  # noqa: E731
        val = _Validation(memory, cfg, img[va], sub(img_nb), None if labels is None else np.asarray(labels)[va],
                          class_embeddings, txt[va], sub(txt_nb))
    history: list[dict[str, float]] = []
    baseline = val.score(None) if val else float("nan")
    if cfg.aggregator == "mean" or cfg.epochs == 0:  # nothing to learn
        model.history = [{"epoch": 0, "val": val.score(model) if val else float("nan"),
                          "val_baseline": baseline}]
        model.best_epoch = 0
        return model.eval()

    steps_per_epoch = max(1, math.ceil(len(tr) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(total * cfg.warmup_fraction))
    opt = _adamw(list(model.parameters()), cfg)
    bf16 = use_bf16(cfg.precision, str(device), img.shape[1])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    start, best, best_epoch, bad = 0, (val.score(model) if val else -math.inf), 0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history.append({"epoch": 0, "loss": float("nan"), "val": best, "val_baseline": baseline, "seconds": 0.0})
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if out and (out / "last" / "trainer_state.pt").exists():
        start, best, best_epoch, bad, history = _resume(out, model, opt, sched, device)
        best_state = {k: v.to(device) for k, v in FusionModel.from_pretrained(out / "best").state_dict().items()}

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
                b = [torch.from_numpy(np.asarray(a[idx], np.float32)).to(device)
                     for a in (img, txt, img_nb[0], txt_nb[0])]
                m_i, m_t = (torch.from_numpy(np.asarray(a[idx])).to(device) for a in (img_nb[1], txt_nb[1]))
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    v_ref, _ = model.refine("image", b[0], b[2], m_i)
                    t_ref, _ = model.refine("text", b[1], b[3], m_t)
                loss = reco_loss(v_ref.float(), t_ref.float(), b[0], b[1], model.logit_scale)
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
    model.history = history
    model.best_epoch = best_epoch
    return model.eval()


def _checkpoint(out: Path, model: FusionModel, opt: Any, sched: Any, epoch: int, best: float, best_epoch: int,
                bad: int, history: list, best_state: dict) -> None:
    """last/ (weights + optimiser state, to resume) and best/ (the model to use). Written then renamed."""
    best_model = FusionModel(model.cfg)
    best_model.load_state_dict({k: v.cpu() for k, v in best_state.items()})
    for name, m in (("best", best_model), ("last", model)):
        tmp = out / f".{name}.tmp"
        m.save_pretrained(tmp)
        if name == "last":
            torch.save({"epoch": epoch, "best": best, "best_epoch": best_epoch, "bad": bad,
                        "history_json": json.dumps(history), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict()}, tmp / "trainer_state.pt")
        final = out / name
        if final.exists():
            old = out / f".{name}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            import shutil

            shutil.rmtree(old)
        else:
            os.replace(tmp, final)


def _resume(out: Path, model: FusionModel, opt: Any, sched: Any, device: str) -> tuple:
    last = FusionModel.from_pretrained(out / "last", device=device)
    if last.cfg != model.cfg:
        raise ValueError(f"{out / 'last'}: checkpoint was trained with {last.cfg}, not {model.cfg}")
    model.load_state_dict(last.state_dict())
    st = torch.load(out / "last" / "trainer_state.pt", map_location=device, weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return st["epoch"], st["best"], st["best_epoch"], st["bad"], json.loads(st["history_json"])
