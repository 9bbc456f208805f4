"""The fusion model: phi_img and phi_txt turn "query + k retrieved embeddings" into a refined one.

Read top to bottom: config, layers, one fuser, the model holding both fusers, save/load.
No I/O besides save/load, no Qdrant.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._deprecated import renamed_argument, renamed_fields, renamed_property
from ._deprecated import renamed_attribute as _renamed

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
AGGREGATORS = ("relevance", "transformer", "mean")
RENAMED_FIELDS = {"learned_classes": "adapted_classes", "seen_uni_projection": "adapted_uni_projection"}


@renamed_fields(RENAMED_FIELDS)
@dataclass
class FusionConfig:
    dim: int  # embedding dimension = transformer width
    k: int = 10  # retrieved tokens per query
    n_heads: int = 8
    mlp_ratio: int = 4
    n_layers: int = 1
    dropout: float = 0.1  # inside attention and MLP
    token_dropout: float = 0.2  # training only: share of retrieved tokens hidden from the query
    # "relevance" (neighbours weighed by their search scores, a learned trust gate; see RelevanceFuser),
    # "transformer" (the paper's fusion transformer) or "mean" (the paper's mean-fusion ablation)
    aggregator: str = "relevance"
    projection: bool = True  # relevance: a learned D x D map on the fused neighbours (P below)
    cross_feature: bool = True  # relevance: the gate sees the query's cosine with its fused neighbours
    uni_term: bool = True  # relevance: also add the neighbours' vectors in the searched modality (U below)
    # relevance: a learned D x D map on U too (Q below): capacity that serves the classes trained on and costs new
    # ones, so by default only `adapted` (the weights for the classes trained on) has it; `adapted_uni_projection`:
    # its flag
    uni_projection: bool = False
    # median cosine of the training class prompts with their fused neighbours, over the best-covered half (see
    # `cross_alignment`): how well the encoder aligned the classes the model learned from; RecoClassifier
    # warns when the classes it is given align far less. None: not measured (no labelled class prompts)
    alignment: float | None = None
    search: str = "uni"  # how neighbours are searched (see neighbors.py)
    fusion: str = "cross"  # which modality of the neighbours is fused
    encoder_id: str | None = None  # encoder whose embeddings this model was trained on
    # how many class prompts a second set of weights (`FusionModel.adapted`) was adapted to, with labels; 0: none
    adapted_classes: int = 0
    adapted_uni_projection: bool = False

    learned_classes = renamed_property("FusionConfig", "learned_classes", "adapted_classes")
    seen_uni_projection = renamed_property("FusionConfig", "seen_uni_projection", "adapted_uni_projection")

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if self.search not in ("uni", "cross"):
            raise ValueError(f"search must be one of ('uni', 'cross'), got {self.search!r}")
        if self.fusion not in ("cross", "uni"):
            raise ValueError(f"fusion must be one of ('cross', 'uni'), got {self.fusion!r}")
        if self.uni_projection and not self.uni_term:
            raise ValueError("uni_projection maps U, the searched modality's term: it needs uni_term=True")
        if self.aggregator == "transformer" and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")


def _masked_mean(r: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(B, D): the mean of the neighbours present, r (B, K, D), m (B, K) the mask in r's dtype, n (B, 1) its sum;
    zeros where none is."""
    return (r * m[..., None]).sum(1) / n.clamp_min(1.0)


def _token_mask(cfg: FusionConfig, mask: torch.Tensor, training: bool) -> torch.Tensor:
    """The retrieved tokens a fuser uses (B, K): at most cfg.k of them; in training, a random share hidden
    (token dropout, so the model never relies on any one neighbour)."""
    if mask.shape[1] > cfg.k:
        raise ValueError(f"{mask.shape[1]} retrieved tokens given, this model takes at most {cfg.k}")
    if training and cfg.token_dropout > 0:
        return mask & (torch.rand(mask.shape, device=mask.device) >= cfg.token_dropout)
    return mask.clone()


class Block(nn.Module):
    """Pre-LN transformer encoder layer with a key-padding mask."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d),
                                 nn.Dropout(cfg.dropout))
        # Initialisation: the MLP's output projection is zero and attention's value and output
        # projections are the identity, so an untrained block adds the attention-weighted average of
        # the (normalised) tokens to the query: training starts from mean fusion and learns whom to
        # attend to, instead of starting from noise that hides the query.
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        with torch.no_grad():
            self.attn.in_proj_weight[2 * d :].copy_(torch.eye(d))
            self.attn.out_proj.weight.copy_(torch.eye(d) / d**0.5)
            self.attn.out_proj.bias.zero_()

    def forward(self, x: torch.Tensor, pad: torch.Tensor, need_weights: bool = False, query_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, 1+K, D) -> (B, 1+K, D); with `query_only`, only the query token's row (B, 1, D).

        The last block only needs the query token (the output), so it skips the other rows' attention
        outputs and MLP: the same result at about a quarter of the cost."""
        h = self.ln1(x)
        q = h[:, :1] if query_only else h
        a, w = self.attn(q, h, h, key_padding_mask=pad, need_weights=need_weights)  # (B, 1 or 1+K, D)
        x = (x[:, :1] if query_only else x) + a
        x = x + self.mlp(self.ln2(x))
        return x, w


class Fuser(nn.Module):
    """One phi: tokens [query, r_1..r_k] + type/rank embeddings -> transformer -> query token."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.type_emb = nn.Parameter(torch.zeros(2, cfg.dim))  # 0 = query, 1 = retrieved
        self.pos_emb = nn.Parameter(torch.zeros(cfg.k + 1, cfg.dim))  # rank of each retrieved token
        nn.init.normal_(self.type_emb, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))

    def forward(self, q: torch.Tensor, r: torch.Tensor, mask: torch.Tensor, need_weights: bool = False,
                scores: torch.Tensor | None = None, searched: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # q (B, D), r (B, K, D), mask (B, K) True where a retrieved token exists; scores, searched unused (the paper)
        b, k, _ = r.shape
        mask = _token_mask(self.cfg, mask, self.training)
        x = torch.cat([q[:, None], r], dim=1)  # (B, 1+K, D)
        types = torch.cat([self.type_emb[:1].expand(1, -1), self.type_emb[1:].expand(k, -1)])  # (1+K, D)
        x = x + types + self.pos_emb[: k + 1]
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=q.device), ~mask], dim=1)  # True = ignore
        w = None
        for i, blk in enumerate(self.blocks):
            x, w = blk(x, pad, need_weights, query_only=i == len(self.blocks) - 1)
        out = F.normalize(x[:, 0], dim=-1)  # (B, D)
        return out, (w[:, 0] if w is not None else None)  # attention of the query token over 1+K tokens


class MeanFuser(nn.Module):
    """The mean-fusion ablation: the query plus the average of the valid retrieved embeddings."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, q: torch.Tensor, r: torch.Tensor, mask: torch.Tensor, need_weights: bool = False,
                scores: torch.Tensor | None = None, searched: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = mask.to(r.dtype)  # (B, K)
        n = m.sum(1, keepdim=True)  # (B, 1)
        mean = _masked_mean(r, m, n)
        w = torch.cat([torch.ones_like(m[:, :1]), m], 1) if need_weights else None
        return F.normalize(q + F.normalize(mean, dim=-1) * (n > 0), dim=-1), (
            w / w.sum(1, keepdim=True) if w is not None else None)


class RelevanceFuser(nn.Module):
    """Fusion that weighs each neighbour by how well it matched the query, and retrieval as a whole by
    how far it can be trusted:

        out = normalize(q + g * normalize(m + P m) + h * U),   m = sum_j w_j r_j,  U = normalize(u + Q u)
                                                               u = sum_j w_j u_j, Q = 0 unless `uni_projection`
        w_j = softmax_j(a * s_j + b * c_j + rank_j)    s_j: search score of neighbour j (searched modality)
                                                       c_j: its agreement with the other neighbours
        g, h = softplus(gate(features)) * (1, e)       top/mean/spread of scores, agreement, share present,
                                                       the query's cosine with the fused neighbours
    r_j are the neighbours' vectors in the fused modality (RECO: the other one), u_j in the searched one (the
    query's own): U smooths the query among its look-alikes, which holds where cross-modal transfer misleads
    (noisy captions, classes absent from the memory).

    The search scores compare the query with each neighbour in the *searched* modality, the reliable
    signal that the paper's transformer never sees (it attends across modalities). Initialised to plain
    averaging (a = b = rank = 0, P = 0, g = 1, e = 1: the query plus the mean neighbour of each modality, or
    mean fusion exactly without U): training leaves it only where validation agrees.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.score_scale = nn.Parameter(torch.zeros(()))  # a
        self.consensus_scale = nn.Parameter(torch.zeros(()))  # b
        self.rank_emb = nn.Parameter(torch.zeros(cfg.k))  # rank_j
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False) if cfg.projection else None  # P
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
        outs = 2 if cfg.uni_term else 1  # g, and h's shape
        self.gate = nn.Sequential(nn.Linear(6 if cfg.cross_feature else 5, 32), nn.GELU(), nn.Linear(32, outs))
        nn.init.zeros_(self.gate[2].weight)
        nn.init.constant_(self.gate[2].bias, math.log(math.e - 1))  # softplus(.) = 1
        self.uni_scale = nn.Parameter(torch.ones(())) if cfg.uni_term else None  # e
        self.uni_proj = nn.Linear(cfg.dim, cfg.dim, bias=False) if cfg.uni_projection else None  # Q
        if self.uni_proj is not None:
            nn.init.zeros_(self.uni_proj.weight)

    def forward(self, q: torch.Tensor, r: torch.Tensor, mask: torch.Tensor, need_weights: bool = False,
                scores: torch.Tensor | None = None, searched: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # q (B, D), r (B, K, D), mask (B, K), scores (B, K) cosine of query and neighbour in the searched modality,
        # searched (B, K, D) the neighbours' vectors in the searched modality
        if scores is None:
            raise ValueError("relevance fusion needs the neighbours' search scores")
        if self.uni_scale is not None and searched is None:
            raise ValueError("this relevance fusion model also needs the neighbours' vectors in the searched modality "
                             "(searched)")
        k = r.shape[1]
        mask = _token_mask(self.cfg, mask, self.training)
        m = mask.to(r.dtype)  # (B, K)
        n = m.sum(1, keepdim=True)  # (B, 1)
        s = torch.where(mask, scores.to(r.dtype), torch.zeros_like(m))  # padded scores are -inf
        mean = _masked_mean(r, m, n)
        c = torch.einsum("bkd,bd->bk", r, F.normalize(mean, dim=-1))  # (B, K) agreement of each with the rest
        logits = self.score_scale * s + self.consensus_scale * c + self.rank_emb[:k]
        w = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1).nan_to_num(0.0)  # (B, K); all-pad -> 0
        fused = (w[..., None] * r).sum(1)  # (B, D)
        fused = F.normalize(fused + self.proj(fused) if self.proj is not None else fused, dim=-1)
        feats = self.features(q, r, mask, scores, self.cfg.cross_feature, mean)
        gates = F.softplus(self.gate(feats)) * (n > 0)  # (B, 1|2)
        g = gates[:, :1]
        out = q + g * fused
        h = torch.zeros_like(g)
        if self.uni_scale is not None:
            h = self.uni_scale * gates[:, 1:]
            u = (w[..., None] * searched.to(r.dtype)).sum(1)
            out = out + h * F.normalize(u + self.uni_proj(u) if self.uni_proj is not None else u, dim=-1)
        out = F.normalize(out, dim=-1)
        total = 1 + g + h.abs()
        weights = torch.cat([1 / total, (g + h.abs()) * w / total], dim=1) if need_weights else None
        return out, weights

    @staticmethod
    def features(q: torch.Tensor, r: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, cross: bool = True,
                 mean: torch.Tensor | None = None) -> torch.Tensor:
        """What the gate sees (B, 6): top, mean and spread of the search scores, the neighbours' agreement
        (length of their mean: 1 when all coincide), the share of the k neighbours present, and (`cross`)
        the query's cosine with their mean in the fused modality: low where the encoder does not align the
        query's concept across modalities, whatever the search scores say. `mean`: that mean (B, D), if known."""
        m = mask.to(r.dtype)
        n = m.sum(1, keepdim=True)
        s = torch.where(mask, scores.to(r.dtype), torch.zeros_like(m))
        if mean is None:
            mean = _masked_mean(r, m, n)
        s_mean = (s * m).sum(1, keepdim=True) / n.clamp_min(1.0)
        s_top = s.masked_fill(~mask, -1.0).max(1, keepdim=True).values
        spread = s_top - s.masked_fill(~mask, 2.0).min(1, keepdim=True).values.clamp(max=1.0)
        feats = [s_top, s_mean, spread, mean.norm(dim=-1, keepdim=True), n / mask.shape[1]]
        if cross:
            feats.append((q * F.normalize(mean, dim=-1)).sum(1, keepdim=True))
        return torch.cat(feats, dim=1)


def neighbour_mean(vectors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, d]: the normalised mean of each query's retrieved vectors [B, k, d] (mask [B, k]); zeros where
    none was retrieved."""
    mean = (np.asarray(vectors, np.float32) * np.asarray(mask, np.float32)[..., None]).sum(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(1e-12)


def mean_fusion(q: np.ndarray, vectors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean fusion, training-free (the `aggregator="mean"` model, in numpy): unit queries [B, d] plus the normalised
    mean of their retrieved vectors [B, k, d] (mask [B, k]), normalised -> [B, d]."""
    out = np.asarray(q, np.float32) + neighbour_mean(vectors, mask)
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def cross_alignment(q: np.ndarray, vectors: np.ndarray, mask: np.ndarray) -> float:
    """How well the encoder aligns the queries' concepts across modalities: the median cosine between a query
    [B, d] and the mean of its fused neighbours [B, k, d] (mask [B, k]), which are of the other modality in
    RECO's mode (class prompts with the images their captions retrieved), over the half of the queries whose
    neighbours agree most (their mean is longest).

    Why that half: a class the memory lacks retrieves scattered look-alikes, whose mean is short and far from
    its prompt even where the encoder knows the name, so a memory covering half of the classes would read as
    an encoder that knows half of them. Its best-covered half measures the encoder, not the coverage."""
    if not len(q):
        return float("nan")
    v = np.asarray(vectors, np.float32) * np.asarray(mask, np.float32)[..., None]
    v = v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-12)
    m = v.sum(1) / np.asarray(mask, np.float32).sum(1, keepdims=True).clip(1.0)  # [B, d]
    agreement = np.linalg.norm(m, axis=1)  # [B]: 1 where all neighbours coincide
    q = np.asarray(q, np.float32) / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    cos = np.einsum("bd,bd->b", q, m / agreement[:, None].clip(1e-12))
    return float(np.median(cos[agreement >= np.median(agreement)]))


class FusionModel(nn.Module):
    """phi_img (refines image queries) and phi_txt (refines text queries), plus the loss temperature."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        make = {"transformer": Fuser, "mean": MeanFuser, "relevance": RelevanceFuser}[cfg.aggregator]
        self.phi_img = make(cfg)
        self.phi_txt = make(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))
        # For the classes it was trained on, a model trained on all of them (see `with_adapted`)
        self.adapted = FusionModel(replace(cfg, adapted_classes=0, uni_projection=cfg.adapted_uni_projection,
                                           adapted_uni_projection=False)) if cfg.adapted_classes else None
        if cfg.adapted_classes:
            self.register_buffer("class_prompts", torch.zeros(cfg.adapted_classes, cfg.dim))  # [C, D]

    def with_adapted(self, adapted: FusionModel, class_prompts: np.ndarray) -> FusionModel:
        """This model plus `adapted`, a model trained on the classes whose prompts [C, D] are given (every labelled
        pair for the full schedule; of its epochs, the one of lowest training loss).

        Why two: early stopping on held-out classes picks the epoch that serves classes the model never saw,
        while on the classes it learns from, accuracy keeps rising until training ends, so one set of weights
        cannot serve both (figures: docs/experiments.md). `RecoClassifier(weights="adapted")` scores with
        `adapted`."""
        out = FusionModel(replace(self.cfg, adapted_classes=len(class_prompts),
                                  adapted_uni_projection=adapted.cfg.uni_projection)).to(self.device)
        out.load_state_dict({**self.own_state_dict(),
                             **{f"adapted.{k}": v for k, v in adapted.own_state_dict().items()},
                             "class_prompts": torch.as_tensor(np.asarray(class_prompts, np.float32))})
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """`nn.Module.load_state_dict`, also reading weights saved before the adapted model was named so
        (`seen.*`)."""
        state = {("adapted." + k[len("seen."):] if k.startswith("seen.") else k): v for k, v in state_dict.items()}
        return super().load_state_dict(state, strict=strict, assign=assign)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's own weights, without `adapted` and the class prompts it was adapted to."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("adapted.") and k != "class_prompts"}

    def adapted_to(self, class_embeddings: np.ndarray, min_cosine: float = 0.99) -> np.ndarray:
        """[C] True where a class embedding [C, D] is one of the prompts `adapted` was trained on (the same
        prompt through the same encoder: cosine >= min_cosine)."""
        if self.adapted is None or not len(class_embeddings):
            return np.zeros(len(class_embeddings), bool)
        known = F.normalize(self.class_prompts.float().cpu(), dim=-1).numpy()
        x = np.asarray(class_embeddings, np.float32)
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        return (x @ known.T).max(1) >= min_cosine

    seen = renamed_property("FusionModel", "seen", "adapted")

    def with_seen(self, seen: FusionModel, class_prompts: np.ndarray) -> FusionModel:
        """Deprecated name of `with_adapted` (one release)."""
        _renamed("FusionModel.with_seen", "FusionModel.with_adapted")
        return self.with_adapted(seen, class_prompts)

    def learned(self, class_embeddings: np.ndarray, min_cosine: float = 0.99) -> np.ndarray:
        """Deprecated name of `adapted_to` (one release)."""
        _renamed("FusionModel.learned", "FusionModel.adapted_to")
        return self.adapted_to(class_embeddings, min_cosine)

    def refine(self, modality: str, q: torch.Tensor, r: torch.Tensor, mask: torch.Tensor,
               need_weights: bool = False, scores: torch.Tensor | None = None,
               searched: torch.Tensor | None = None, keys: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refined, L2-normalised [B, D] embeddings of queries of `modality` ("image" or "text").

        q [B, D], r [B, K, D] retrieved vectors, mask [B, K], scores [B, K] their search scores, searched
        [B, K, D] their vectors in the searched modality (see `needs_searched_vectors`; `keys` is its deprecated
        name)."""
        searched = renamed_argument("keys", keys, "searched", searched)
        phi = {"image": self.phi_img, "text": self.phi_txt}[modality]
        return phi(q, r, mask, need_weights, scores, searched)

    @property
    def needs_searched_vectors(self) -> bool:
        """Whether `refine` needs the neighbours' vectors in the searched modality too."""
        return self.cfg.aggregator == "relevance" and self.cfg.uni_term

    needs_keys = renamed_property("FusionModel", "needs_keys", "needs_searched_vectors")

    @torch.no_grad()
    def refine_numpy(self, modality: str, q: np.ndarray, vectors: np.ndarray, mask: np.ndarray,
                     need_weights: bool = False, batch_size: int = 1024, scores: np.ndarray | None = None,
                     searched: np.ndarray | None = None, keys: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """`refine` on numpy arrays, in batches, in eval mode: q [B, D], vectors [B, k, D], mask [B, k],
        scores [B, k], searched [B, k, D] -> (refined [B, D], the weights of [query, neighbours] [B, 1+k] or None)."""
        searched = renamed_argument("keys", keys, "searched", searched)
        was_training = self.training
        self.eval()
        dev = self.device
        out, weights = [], []
        def tensor(a: np.ndarray, s: int, dtype: Any = None) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[s:s + batch_size], dtype)).to(dev)

        for s in range(0, len(q), batch_size):
            r, w = self.refine(modality, tensor(q, s, np.float32), tensor(vectors, s, np.float32), tensor(mask, s),
                               need_weights, None if scores is None else tensor(scores, s, np.float32),
                               None if searched is None else tensor(searched, s, np.float32))
            out.append(r.cpu().numpy())
            if w is not None:
                weights.append(w.cpu().numpy())
        self.train(was_training)
        refined = np.concatenate(out) if out else np.zeros((0, self.cfg.dim), np.float32)
        return refined, (np.concatenate(weights) if weights else None)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> Path:
        """Write `model.safetensors` + `config.json` (no pickles) to the directory `path`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME))
        (path / CONFIG_NAME).write_text(json.dumps({"model_type": "reco-fusion", **asdict(self.cfg)}, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None) -> FusionModel:
        """Load a checkpoint written by `save_pretrained`; safetensors only, nothing is unpickled."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing; a fusion checkpoint is a directory with "
                                        f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        raw: dict[str, Any] = json.loads(cfg_path.read_text())
        if raw.pop("model_type", None) != "reco-fusion":
            raise ValueError(f"{cfg_path}: not a reco-fusion checkpoint")
        for old, new in RENAMED_FIELDS.items():
            if old in raw:  # written before the adapted model was named so
                raw[new] = raw.pop(old)
        if raw.get("aggregator", "relevance") == "relevance":
            raw.setdefault("cross_feature", False)  # written before the gate saw the cross-modal cosine
            raw.setdefault("uni_term", False)  # ... and before the searched modality's term
        known = {f.name for f in fields(FusionConfig)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{cfg_path}: unknown config fields {sorted(unknown)}")
        model = cls(FusionConfig(**raw))
        try:
            model.load_state_dict(load_file(str(w_path)))
        except RuntimeError as e:
            raise ValueError(f"{w_path}: weights do not match {cfg_path} ({str(e).splitlines()[0]})") from e
        return model.to(device or "cpu").eval()
