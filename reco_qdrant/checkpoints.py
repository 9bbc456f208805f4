"""A training run on disk: its digest (run.json), per-epoch checkpoints (last/, best/) written whole, and resume."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import durable
from .fusion import FusionModel
from .memory import Memory
from .neighbour_cache import _digest

if TYPE_CHECKING:
    from .training import TrainConfig

RUN_FILE = "run.json"
_NOT_IN_DIGEST = ("progress", "out_dir", "on_mismatch", "cache_dir", "cache_keep", "device")
# old setting names: `train_fusion(**settings)` still takes them for one release, with a warning, and the renamed
# settings are digested under them, so that runs started before the rename still resume
RENAMED_SETTINGS = {"seen_model": "adapted_model", "seen_uni_projection": "adapted_uni_projection"}
_DIGESTED_AS = {new: old for old, new in RENAMED_SETTINGS.items()}


def _run_digest(memory: Memory, cfg: TrainConfig, img: np.ndarray, txt: np.ndarray, labels: Any,
                class_embeddings: Any, ids: Any) -> dict[str, str]:
    """Everything a training result depends on, digested part by part (so a mismatch can be named)."""
    return {"training pairs": _digest(img, txt), "labels": _digest(labels),
            "class embeddings": _digest(class_embeddings), "ids": _digest(ids),
            "memory (id and write version)": f"{memory.uid}@{memory.write_version}",
            # without labels, how pseudo-classes are made (a run made otherwise does not resume)
            **({"pseudo-classes": "pairs for training, images for validation"} if labels is None else {}),
            **{f"setting {_DIGESTED_AS.get(k, k)}": repr(v) for k, v in asdict(cfg).items() if k not in _NOT_IN_DIGEST
               and not (k == "pseudo_class_size" and labels is not None)}}  # unused with labels: old runs resume


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
    """Load out/last into the model, optimiser and scheduler. Returns (epoch, best score, best epoch, epochs
    without improvement, history, the best weights: out/best's own, without `adapted`, which a finished run holds)."""
    last = FusionModel.from_pretrained(out / "last", device=device)
    if last.cfg != model.cfg:
        raise ValueError(f"{out / 'last'}: checkpoint was trained with {last.cfg}, not {model.cfg}")
    model.load_state_dict(last.state_dict())
    st = torch.load(out / "last" / "trainer_state.pt", map_location=device, weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    best_state = {k: v.to(device) for k, v in FusionModel.from_pretrained(out / "best").own_state_dict().items()}
    return st["epoch"], st["best"], st["best_epoch"], st["bad"], json.loads(st["history_json"]), best_state
