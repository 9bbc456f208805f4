"""Contrastive losses for training the fusion model with frozen encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned, L2-normalised a [B, D] and b [B, D]."""
    logits = logit_scale.exp().clamp(max=100.0) * a @ b.T  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def reco_loss(img_refined: torch.Tensor, txt_refined: torch.Tensor, img: torch.Tensor, txt: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Refined image vs refined text, plus refined-vs-original terms that keep both refined spaces
    compatible with the encoder's own (they regularise against memorising training classes)."""
    return (clip_loss(img_refined, txt_refined, logit_scale)
            + clip_loss(img_refined, txt, logit_scale)
            + clip_loss(img, txt_refined, logit_scale)) / 3
