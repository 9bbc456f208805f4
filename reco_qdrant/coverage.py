"""How well the memory covers an image query, read against the memory's own pairs: no labels, no learning.

Refining by retrieval helps when the memory holds the concept an image shows, and hurts when it does not: an
image of a species the memory lacks retrieves captions of other species, and a fusion that trusts them is
confidently wrong. Whether the memory covers the classes asked about cannot be learned from training pairs (the
memory's own pairs are covered by construction); it can be read, per image, at prediction time: a memory that
holds an image's concept holds images like it. The reading is the image's top image-search score, ranked among
the same score of a sample of the memory's own images (each searched without itself and copies of it), so that
the threshold is a quantile of the memory's own figures, never a raw cosine, whatever the encoder.

`trust = min(1, rank / q)`: 1 for an image at least as close to the memory as the memory's own q-quantile,
falling linearly to 0 below it. The classifier mixes RECO's and the plain encoder's class logits by it; as the
encoder's logits are on CLIP's scale (100) and RECO's on the fusion's learned one (about 14), the encoder's
answer takes over well before trust falls to 0.5: the ramp acts close to a switch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .memory import Memory
from .neighbors import retrieve

# The share of the memory's own images whose reading counts as doubtful: the best worst case against the
# training-free choices for the default fusion on the dev species of the zero-shot protocol, among
# 0.05 / 0.075 / 0.1 / 0.15 / 0.2 (docs/experiments.md, "The coverage gate").
TRUST_QUANTILE = 0.05
REFERENCE_PAIRS = 1500  # sampled images: a quantile near 0.05 to about +-0.01 in rank
DEDUP = 0.98  # a sampled image's copies (cosine) are not its neighbours


@dataclass
class CoverageReference:
    """The top image-search scores of a sample of the memory's own images, sorted, to rank a query's against."""

    image_top: np.ndarray  # [m] sorted: sampled images' top image-search scores, copies excluded (m <= n)
    memory_uid: str  # the memory read, and its write version then: a reference is only valid for those
    write_version: str
    quantile: float = TRUST_QUANTILE
    n: int = REFERENCE_PAIRS  # how it was drawn, to draw again alike after the memory changes
    seed: int = 0

    @classmethod
    def from_memory(cls, memory: Memory, n: int = REFERENCE_PAIRS, seed: int = 0,
                    quantile: float = TRUST_QUANTILE) -> CoverageReference:
        """Read a uniform sample of `n` of the memory's images, each searched without its own point and its
        copies (cosine >= DEDUP); an image with nothing but copies is left out. Costs one pass over the memory's
        vectors (`Memory.sample_pairs`) and n searches. Warns when fewer than 2 / quantile images remain: the
        ramp below the quantile then has too few steps to mean much."""
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        version = memory.write_version
        ids, img, _ = memory.sample_pairs(n, seed=seed, progress=False) if memory.count() else ([], None, None)
        top = np.zeros(0, np.float32)
        if len(ids):
            own = retrieve(memory, img, "image", 1, "uni", "cross", exclude_ids=ids, dedup_threshold=DEDUP,
                           with_payload=False, with_vectors=False)
            top = own.scores[:, 0][np.isfinite(own.scores[:, 0])]
        if not len(top):
            raise ValueError(f"the coverage reference needs a memory of at least 2 distinct images; this one holds "
                             f"{memory.count()} pair(s), none with a neighbour other than its own copies")
        if len(top) < 2 / quantile:
            warnings.warn(f"the coverage reference holds only {len(top)} images: trust below the {quantile:g} "
                          "quantile is coarse", stacklevel=2)
        return cls(np.sort(top), memory.uid, version, quantile, n, seed)

    def fits(self, memory: Memory) -> bool:
        """True if this reference was read from `memory` as it is now (no write since)."""
        return self.memory_uid == memory.uid and self.write_version == memory.write_version

    def trust(self, image_top: np.ndarray) -> np.ndarray:
        """[B] top image-search scores of B images -> trust [B] in [0, 1]."""
        rank = np.searchsorted(self.image_top, image_top, side="right") / len(self.image_top)
        return np.minimum(1.0, rank / self.quantile).astype(np.float32)
