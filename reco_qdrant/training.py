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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoders import default_device
from .fusion import FusionConfig, FusionModel
from .loss import reco_loss
from .memory import Memory, validate_embeddings
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
    on_mismatch: str = "error"  # out_dir holds a run on other inputs or settings: "error" | "restart" (train afresh)
    cache_dir: str | None = None  # neighbour cache; default out_dir/cache, else $RECO_CACHE or ~/.cache/reco_qdrant
    cache_keep: int = 8  # neighbour caches kept in the cache directory (the least recently used are pruned)
    progress: bool = True


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
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr)


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return h.hexdigest()[:20]


def cache_root(cfg: TrainConfig) -> Path:
    """Where neighbour caches live: `cache_dir`, else beside the run (`out_dir/cache`), else $RECO_CACHE
    or ~/.cache/reco_qdrant."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir) / "neighbours"
    if cfg.out_dir:
        return Path(cfg.out_dir) / "cache" / "neighbours"
    return Path(os.environ.get("RECO_CACHE", Path.home() / ".cache" / "reco_qdrant")) / "neighbours"


def _prune_cache(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used caches in `root`."""
    entries = sorted(root.glob("*.vectors.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[max(keep, 0):]:
        key = old.name.removesuffix(".vectors.npy")
        for p in (old, root / f"{key}.mask.npy"):
            p.unlink(missing_ok=True)


def neighbour_cache(memory: Memory, queries: np.ndarray, query_modality: str, cfg: TrainConfig,
                    ids: list[str | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour vectors [N, k, d] (float16, memory-mapped) and mask [N, k] for each query, cached on
    disk under a key of the memory's id and write version (it changes with every upsert and delete),
    the mode and the queries."""
    root = cache_root(cfg)
    key = _digest(memory.uid, memory.write_version, cfg.k, cfg.search, cfg.fusion, query_modality,
                  cfg.self_exclusion, cfg.dedup_threshold, ids, queries)
    vec_path, mask_path = root / f"{key}.vectors.npy", root / f"{key}.mask.npy"
    if vec_path.exists() and mask_path.exists():
        os.utime(vec_path)  # recently used: pruned last
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
                          dedup_threshold=cfg.dedup_threshold if cfg.self_exclusion else None,
                          with_payload=False)
            vecs[s:e], mask[s:e] = nb.vectors, nb.mask
            advance(e - s)
    vecs.flush()
    del vecs
    np.save(mask_path, mask)
    os.replace(tmp, vec_path)  # the cache appears whole or not at all
    _prune_cache(root, cfg.cache_keep)
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
    if cfg.on_mismatch not in ("error", "restart"):
        raise ValueError(f"on_mismatch must be 'error' or 'restart', got {cfg.on_mismatch!r}")
    img, txt, labels, class_embeddings = _check_inputs(memory, image_embeddings, text_embeddings, labels,
                                                       class_embeddings, ids)
    if memory.count() < cfg.k:
        raise ValueError(f"the memory holds {memory.count()} points, fewer than k={cfg.k}: ingest data first")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    run = _run_digest(memory, cfg, img, txt, labels, class_embeddings, ids)
    resumable = out is not None and _prepare_out_dir(out, run, cfg.on_mismatch)
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
    opt = _adamw(model, cfg)
    bf16 = use_bf16(cfg.precision, str(device), img.shape[1])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    start, best, best_epoch, bad = 0, (val.score(model) if val else -math.inf), 0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history.append({"epoch": 0, "loss": float("nan"), "val": best, "val_baseline": baseline, "seconds": 0.0})
    if resumable:
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
            **{f"setting {k}": repr(v) for k, v in asdict(cfg).items() if k not in _NOT_IN_DIGEST}}


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
    for name, m in (("best", best_model), ("last", model)):
        tmp, old = out / f".{name}.tmp", out / f".{name}.old"
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        m.save_pretrained(tmp)
        if name == "last":
            torch.save({"epoch": epoch, "best": best, "best_epoch": best_epoch, "bad": bad,
                        "history_json": json.dumps(history), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict()}, tmp / "trainer_state.pt")
        final = out / name
        if final.exists():  # a crash between these renames is undone by `_recover`
            os.replace(final, old)
            os.replace(tmp, final)
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
