"""How well the memory covers an image query, read against the memory's own pairs: no labels, no learning.

Refining by retrieval helps when the memory holds the concept an image shows, and hurts when it does not: an
image of a species the memory lacks retrieves captions of other species, and a fusion that trusts them is
confidently wrong. Whether the memory covers the classes asked about cannot be learned from training pairs (the
memory's own pairs are covered by construction); it can be read, per image, at prediction time: a memory that
holds an image's concept holds images like it. The reading is the image's top image-search score, ranked among
the same score of a sample of the memory's own images (each searched without itself and copies of it), so that
the threshold is a quantile of the memory's own figures, never a raw cosine, whatever the encoder.

`trust = min(1, rank / q)`: 1 for an image at least as close to the memory as the memory's own q-quantile,
falling linearly to 0 below it. The classifier scores on one scale (`GateScale`), RECO's: the spread of its scores
between the reference images and captions.

- What the neighbours say: RECO's scores, with `BLEND` of the score given to mean fusion of the same neighbours
  (training-free), put on RECO's spread. The learned fusion, trained on a few thousand unlabelled pairs, and plain
  averaging err on different images: together they score above either alone on every dev suite.
- What the encoder says, added to a doubted image by (1 - trust): each class's encoder scores standardised against
  the same class's scores of the reference images, in RECO's spread, so that neither the encoder's sharper cosines
  nor a prompt close to every image decides. A fully doubted image keeps half of the neighbours' evidence (`KEEP`):
  the encoder's answer is added to it, not swapped for it, which costs least where the encoder does not know the
  names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .memory import Memory
from .neighbors import retrieve

# The share of the memory's own images whose reading counts as doubtful, the share of the neighbours' evidence a
# fully doubted image keeps, and mean fusion's share of that evidence: chosen for the default fusion by the best
# worst case against the training-free choices, then the best mean, over the dev species and two families of dev
# synthetic worlds, among 0.05 / 0.1 / 0.15 / 0.2, 0.25 / 0.5 and 0 / 0.25 / 0.4 / 0.5 / 0.6 / 0.75
# (docs/experiments.md, "The coverage gate on one scale" and "Mean fusion beside RECO").
TRUST_QUANTILE = 0.1
KEEP = 0.5
BLEND = 0.4
# The least spread a class's encoder scores are given, as a share of the encoder's spread between the reference
# images and captions: a prompt that scores every image alike must not be amplified into the loudest voice (a floor
# read on the reference alone, never on the other classes given).
GATE_FLOOR = 0.1
REFERENCE_PAIRS = 1500  # sampled images: a quantile near 0.1 to about +-0.01 in rank
# A reference stays in use until the memory's point count has moved by more than this share since it was read: a
# few writes hardly move a quantile of 1,500 sampled images, and reading it again costs a pass over the memory, which
# a service that predicts while it ingests must not pay at every call
REFRESH = 0.05
DEDUP = 0.98  # a sampled image's copies (cosine) are not its neighbours


class CoverageUnavailable(ValueError):
    """The memory holds too few distinct images to read a coverage reference from."""


@dataclass
class CoverageReference:
    """The top image-search scores of a sample of the memory's own images, sorted, to rank a query's against."""

    image_top: np.ndarray  # [m] sorted: sampled images' top image-search scores, copies excluded (m <= n)
    memory_uid: str  # the memory read, and its write version then
    write_version: str
    quantile: float = TRUST_QUANTILE
    n: int = REFERENCE_PAIRS  # how it was drawn, to draw again alike after the memory changes
    seed: int = 0
    ids: list[str] = field(default_factory=list)  # [m] the sampled points behind image_top (any order)
    images: np.ndarray | None = None  # [m, d] their image vectors and
    texts: np.ndarray | None = None  # [m, d] text vectors: the yardstick of the gate's scale (`GateScale`)
    count: int | None = None  # the memory's point count when read (None: unknown, so only an unchanged memory fits)

    @classmethod
    def from_memory(cls, memory: Memory, n: int = REFERENCE_PAIRS, seed: int = 0,
                    quantile: float = TRUST_QUANTILE, progress: bool = False) -> CoverageReference:
        """Read a uniform sample of `n` of the memory's images, each searched without its own point and its
        copies (cosine >= DEDUP); an image with nothing but copies is left out. Costs one pass over the memory's
        vectors (`Memory.sample_pairs`) and n searches. Warns when fewer than 2 / quantile images remain: the
        ramp below the quantile then has too few steps to mean much."""
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        version, count = memory.write_version, memory.count()
        ids, img, txt = memory.sample_pairs(n, seed=seed, progress=progress) if count else ([], None, None)
        top, kept = np.zeros(0, np.float32), np.zeros(0, bool)
        if len(ids):
            own = retrieve(memory, img, "image", 1, "uni", "cross", exclude_ids=ids, dedup_threshold=DEDUP,
                           with_payload=False, with_vectors=False)
            kept = np.isfinite(own.scores[:, 0])
            top = own.scores[:, 0][kept]
        if not len(top):
            raise CoverageUnavailable(f"the coverage reference needs a memory of at least 2 distinct images; this one "
                                      f"holds {count} pair(s), none with a neighbour other than its own copies "
                                      "(RecoClassifier(gate='none') scores without the gate)")
        if len(top) < 2 / quantile:
            warnings.warn(f"the coverage reference holds only {len(top)} images: trust below the {quantile:g} "
                          "quantile is coarse", stacklevel=2)
        return cls(np.sort(top), memory.uid, version, quantile, n, seed, [i for i, k in zip(ids, kept) if k],
                   img[kept], txt[kept], count)

    def fits(self, memory: Memory) -> bool:
        """True if this reference was read from `memory` and still stands for it: no write since, or writes that
        moved its point count by at most REFRESH."""
        if self.memory_uid != memory.uid:
            return False
        if self.write_version == memory.write_version:
            return True
        return self.count is not None and abs(memory.count() - self.count) <= REFRESH * max(self.count, 1)

    def trust(self, image_top: np.ndarray) -> np.ndarray:
        """[B] top image-search scores of B images -> trust [B] in [0, 1]."""
        rank = np.searchsorted(self.image_top, image_top, side="right") / len(self.image_top)
        return np.minimum(1.0, rank / self.quantile).astype(np.float32)


@dataclass
class GateScale:
    """The scale on which the gate puts mean fusion's and the encoder's evidence beside RECO's, for the classes given:
    the spreads of RECO's and of mean fusion's scores between the reference images and captions, and per class the
    mean and spread of the encoder's scores over the reference images. Each class's figures depend on that class
    alone, never on the others given."""

    reco_spread: float
    mean_spread: float
    encoder_mean: np.ndarray  # [C]
    encoder_std: np.ndarray  # [C]

    @staticmethod
    def spread(scores: np.ndarray) -> float:
        """scores [m, m'] between reference images and reference captions (RECO's and mean fusion's: both refined;
        the encoder's: as they are) -> their spread."""
        s = float(scores.std())
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"the reference pairs' scores have no usable spread ({s}): the memory's vectors may "
                             "be damaged (`reco doctor`) or all alike")
        return s

    @classmethod
    def from_reference(cls, reco_spread: float, mean_spread: float, encoder: np.ndarray, floor: float) -> GateScale:
        """RECO's and mean fusion's spreads (`spread`), encoder [m, C]: the reference images' plain scores against the
        classes' prompts, and the least spread a class's scores are given (`GATE_FLOOR` times the encoder's
        `spread`)."""
        return cls(reco_spread, mean_spread, encoder.mean(0).astype(np.float32),
                   np.maximum(encoder.std(0), floor).astype(np.float32))

    def mix(self, reco: np.ndarray, mean: np.ndarray, encoder: np.ndarray, trust: np.ndarray) -> np.ndarray:
        """RECO's scores [B, C] (refined image . refined class), mean fusion's [B, C] (the same, mean-fused) and the
        encoder's [B, C] (image . prompt) mixed per image by trust [B], on RECO's scale: trust 1 gives the neighbours'
        evidence, RECO's scores with BLEND of mean fusion's put on RECO's spread; trust 0 KEEP of that plus the rest
        of the encoder's, standardised per class and put in RECO's spread."""
        neighbours = (1 - BLEND) * reco + BLEND * (self.reco_spread / self.mean_spread) * mean
        doubt = ((1 - trust) * (1 - KEEP))[:, None]
        z_enc = (encoder - self.encoder_mean) / self.encoder_std
        return (1 - doubt) * neighbours + doubt * self.reco_spread * z_enc
