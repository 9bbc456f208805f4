"""Zero-shot classification with retrieval-refined image and class embeddings."""

from __future__ import annotations

import string
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ._deprecated import renamed_property
from .coverage import DEDUP, GATE_FLOOR, CoverageReference, CoverageUnavailable, GateScale
from .encoders import Encoder, encoder_from_record
from .fusion import FusionModel, cross_alignment, mean_fusion
from .memory import EncoderMismatchError, Memory, Neighbours, validate_embeddings
from .neighbors import retrieve

# A warning only: classes whose prompts align with their retrieved neighbours less than this share of the classes
# a fusion was trained on with labels and prompts have names the encoder does not know. Half lies far from both
# groups seen on real images (figures: docs/experiments.md, "The guard").
ALIGNMENT_WARNING = 0.5
WEIGHTS = ("zero-shot", "adapted")
GATES = ("none", "coverage")
BASELINE_SCALE = 100.0  # CLIP's logit scale: the plain encoder's probabilities

# CLIP's prompt templates (a few of each set); always report the baseline with the same prompts.
TEMPLATES: dict[str, list[str]] = {
    "generic": ["a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
                "a photo of the small {}.", "a close-up photo of a {}.", "a bright photo of a {}.",
                "a cropped photo of a {}.", "a good photo of a {}."],
    "birds": ["a photo of a {}, a type of bird."],
    "flowers": ["a photo of a {}, a type of flower."],
    "cars": ["a photo of a {}.", "a photo of my {}.", "a photo of the {}, a type of car.",
             "a photo of a {}, a type of car."],
    "dogs": ["a photo of a {}, a type of dog.", "a photo of a {}, a type of pet."],
}


def check_template(t: str) -> None:
    """A template must contain `{}` exactly once and no other placeholder."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
    except ValueError as e:
        raise ValueError(f"template {t!r} is malformed ({e})") from e
    if fields != [""]:
        raise ValueError(f"template {t!r} must contain exactly one '{{}}' placeholder and no other; "
                         f"found {['{' + f + '}' for f in fields] or 'none'}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [B, C] logits."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


class _GateCache(NamedTuple):
    """What the gate reads once per reference (the spreads, the encoder's floor) and once per class list (the scale),
    replaced whole so that a prediction running beside another, or beside set_classes, never sees a mix of two."""

    reference: CoverageReference
    reco_spread: float
    mean_spread: float
    encoder_floor: float
    prompts: np.ndarray | None = None  # [C, d] the class prompts the scale was read for
    scale: GateScale | None = None


@dataclass
class Explanation:
    """What retrieval and fusion did for a batch of queries."""

    refined: np.ndarray  # [B, d]
    neighbours: Neighbours  # ids/scores/captions [B, k], vectors [B, k, d]
    attention: np.ndarray | None  # [B, 1 + k]: the weight of the query and of each neighbour in the result
    trust: np.ndarray | None = None  # [B] image queries under the coverage gate: t in the scores (1 - d) *
    # neighbours + d * encoder, d = (1 - t) * (1 - KEEP) (`GateScale.mix`); 1: the neighbours' evidence alone


class RecoClassifier:
    """Zero-shot classifier: CLIP scores between refined image and refined class embeddings.

    Args:
        memory: the memory to retrieve from (any memory built with the same encoder).
        fusion: a trained `FusionModel`; its mode (search/fusion) and k are used.
        encoder: for `set_classes`/`predict` on raw images and names (default: the one the memory records,
            loaded when first needed); not needed for `*_embeddings`.
        k: neighbours per query (default: the fusion model's k).
        use_retrieval: False gives the plain CLIP baseline with the same object and prompts.
        weights: "zero-shot" (default) refines with the fusion's own weights, trained for classes it never saw;
            "adapted" with the weights it adapted, with labels, to the classes it was trained on
            (`FusionModel.adapted`, from `train_fusion(labels=..., class_embeddings=...)`): for those classes only,
            so `set_class_embeddings` warns about any class given that is not one of them. The choice is the
            user's and holds for every call: nothing switches models by the classes given.
        gate: "coverage" (the default with zero-shot weights) scores on RECO's scale (`gate_scale_`, read on a
            sample of the memory's own pairs) the neighbours' evidence, RECO's scores with `BLEND` (0.4) given to
            mean fusion of the same neighbours, and adds per image the plain encoder's evidence by how far the memory
            is trusted to cover that image (`coverage.py`: its top image-search score, ranked among the memory's own
            images'): none at trust 1, up to half of the score at trust 0, standardised per class on the reference
            images. Trust reads the image only, the scale each class alone: never the other classes given.
            "none" (the default with adapted weights, or without retrieval): RECO's logits alone, as the fusion
            was trained to give them. The default was chosen on dev species and dev synthetic worlds by its worst
            case against the training-free choices (README, "Options").
        coverage: a `CoverageReference` already read from this memory (default: read at the first gated
            prediction, from 1,500 of its images, in one pass over the memory's vectors; kept in `coverage_` and
            read again once writes have moved its point count by more than 5%). Where the memory holds too few
            distinct images for one, the default gate is dropped with a warning; `gate="coverage"` asked for
            explicitly raises instead.
        progress: show a progress bar while that pass reads the memory (seconds at 100k pairs, minutes at
            millions).
    """

    def __init__(self, memory: Memory | None = None, fusion: FusionModel | None = None,
                 encoder: Encoder | None = None, k: int | None = None, use_retrieval: bool = True,
                 batch_size: int = 256, device: str | None = None, weights: str = "zero-shot",
                 gate: str | None = None, coverage: CoverageReference | None = None, progress: bool = False) -> None:
        if use_retrieval and (memory is None or fusion is None):
            raise ValueError("retrieval needs a memory and a fusion model (or use_retrieval=False)")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        self._gate_by_default = gate is None
        if gate is None:
            gate = "coverage" if use_retrieval and weights == "zero-shot" else "none"
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if gate != "none" and not use_retrieval:
            raise ValueError(f"gate={gate!r} mixes RECO's scores with the encoder's: it needs retrieval")
        if weights == "adapted" and (fusion is None or fusion.adapted is None):
            raise ValueError("weights='adapted' needs a fusion model adapted to its classes (trained with labels and "
                             "class_embeddings: `reco train --adapt`); this one has only zero-shot weights")
        self.memory, self.fusion, self.encoder = memory, fusion, encoder
        self.use_retrieval, self.batch_size, self.weights, self.gate = use_retrieval, batch_size, weights, gate
        self.progress = progress
        self.coverage_: CoverageReference | None = coverage  # read from the memory at the first gated prediction
        self._gate_cache: _GateCache | None = None
        self.refiner_ = fusion.adapted if weights == "adapted" else fusion  # the model that refines, always
        self.alignment_: float | None = None  # of the classes given (see `fusion.cross_alignment`)
        self.adapted_share_ = 0.0  # share of the classes given that the fusion model was adapted to
        self.k = k or (fusion.cfg.k if fusion else 10)
        if fusion is not None:
            if self.k > fusion.cfg.k:
                raise ValueError(f"k={self.k} exceeds the fusion model's k={fusion.cfg.k}")
            self.device = device or str(fusion.device)
            fusion.to(self.device)
            if memory is not None and memory.dim is not None and memory.dim != fusion.cfg.dim:
                raise EncoderMismatchError(f"fusion model is {fusion.cfg.dim}-d, memory holds {memory.dim}-d")
            rec = memory.encoder_record if memory is not None else None
            fid = fusion.cfg.encoder_id
            if rec and fid and rec["id"] not in ("unspecified", fid):
                raise EncoderMismatchError(f"fusion model was trained on {fid!r} embeddings, the memory "
                                           f"holds {rec['id']!r} ones")
        if encoder is not None and memory is not None:
            memory.check_encoder(encoder.id, encoder.dim)
        # (names, prompt embeddings [C, d] as given, refined (or plain) [C, d], mean-fused [C, d] or None): replaced
        # whole, so that a prediction beside set_classes reads one class list
        self._classes: tuple[list[str], np.ndarray | None, np.ndarray | None, np.ndarray | None] = ([], None, None,
                                                                                                 None)
        if coverage is not None and memory is not None and coverage.memory_uid != memory.uid:
            raise ValueError("the coverage reference was read from another memory "
                             f"(uid {coverage.memory_uid}, this one is {memory.uid})")

    # ------------------------------------------------------------------ refinement
    fusion_used_ = renamed_property("RecoClassifier", "fusion_used_", "refiner_")
    learned_share_ = renamed_property("RecoClassifier", "learned_share_", "adapted_share_")

    def explain(self, embeddings: np.ndarray, modality: str = "image") -> Explanation:
        """Refine [B, d] embeddings and return the neighbours and attention behind each one, and, for image queries
        under `gate="coverage"`, the trust [B] by which `predict` adds the encoder's evidence (`GateScale.mix`)."""
        x = validate_embeddings(embeddings, f"{modality} embeddings", self.fusion.cfg.dim, "query")
        nb = self._neighbours(x, modality, with_payload=True)
        refined, attention = self._fuse(modality, x, nb, need_weights=True)
        ref = self._read_coverage() if modality == "image" and self.gate == "coverage" else None
        return Explanation(refined, nb, attention, None if ref is None else self._trust(x, nb, ref))

    def refine(self, embeddings: np.ndarray, modality: str = "image") -> np.ndarray:
        """[B, d] -> refined [B, d] (unchanged, normalised, when retrieval is off)."""
        x = validate_embeddings(embeddings, f"{modality} embeddings", None, "query")
        if not self.use_retrieval:
            return x
        return np.concatenate([refined for _, _, refined in self._refined_batches(x, modality)])

    def _refined_batches(self, x: np.ndarray, modality: str) -> Iterator[tuple[np.ndarray, Neighbours, np.ndarray]]:
        """(queries [b, d], their neighbours, refined [b, d]) for each batch of unit queries x [B, d]."""
        for s in range(0, len(x), self.batch_size):
            q = x[s : s + self.batch_size]
            nb = self._neighbours(q, modality)
            yield q, nb, self._fuse(modality, q, nb)[0]

    def _neighbours(self, q: np.ndarray, modality: str, with_payload: bool = False,
                    exclude_ids: Sequence[str] | None = None) -> Neighbours:
        """Neighbours of queries [B, d] under the fusion model's mode, with their vectors in the searched
        modality (`searched_vectors`) when they will be fused by a model that uses them. With `exclude_ids` (the
        queries' own points in the memory), a query never meets its own pair or copies of it."""
        cfg = self.fusion.cfg
        return retrieve(self.memory, q, modality, self.k, cfg.search, cfg.fusion, exclude_ids=exclude_ids,
                        dedup_threshold=None if exclude_ids is None else DEDUP, batch_size=self.batch_size,
                        with_payload=with_payload, with_searched_vectors=self.refiner_.needs_searched_vectors)

    def _read_coverage(self) -> CoverageReference | None:
        """The coverage reference of the memory as it is now: read once, and again (drawn alike) once writes have
        moved the memory's point count by more than `coverage.REFRESH`; checked once per call, so that a memory
        being written to is not read again for every batch. None, with a warning, where the memory holds too few
        distinct images for one and the gate was the default: the classifier then scores without it."""
        ref = self.coverage_
        try:
            if ref is None:
                ref = self.coverage_ = CoverageReference.from_memory(self.memory, progress=self.progress)
            elif not ref.fits(self.memory):
                ref = self.coverage_ = CoverageReference.from_memory(self.memory, ref.n, ref.seed, ref.quantile,
                                                                     self.progress)
        except CoverageUnavailable as e:
            if not self._gate_by_default:
                raise
            warnings.warn(f"{e}; this classifier scores without the coverage gate from now on", stacklevel=3)
            self.gate = "none"
            return None
        return ref

    def _trust(self, q: np.ndarray, nb: Neighbours, ref: CoverageReference) -> np.ndarray:
        """Coverage trust [B] of unit image queries [B, d] whose neighbours under the fusion's mode are `nb`, by the
        reference `ref` (the one a whole prediction reads)."""
        if self.fusion.cfg.search != "uni":  # the reading is an image-to-image search score
            nb = retrieve(self.memory, q, "image", 1, "uni", "cross", batch_size=self.batch_size,
                          with_payload=False, with_vectors=False)
        return ref.trust(nb.scores[:, 0])

    @property
    def gate_scale_(self) -> GateScale | None:
        """The gate's scale for the classes given now, once a gated prediction has read it (else None)."""
        cache = self._gate_cache
        return cache.scale if cache is not None and cache.prompts is self.raw_class_embeddings_ else None

    def _gate_scale(self, ref: CoverageReference, raw: np.ndarray) -> GateScale:
        """The gate's scale for class prompts raw [C, d] on the reference pairs: RECO's and mean fusion's spreads
        (each reference image and caption refined as a query that never meets its own pair or copies; once per
        reference) and each class's encoder figures (once per class list)."""
        cache = self._gate_cache
        if cache is None or cache.reference is not ref:
            if ref.images is None or ref.texts is None or not len(ref.ids):
                raise ValueError("this coverage reference holds no sampled pairs to put the encoder's scores on "
                                 "RECO's scale; read it with CoverageReference.from_memory")
            reco, mean = {}, {}
            for m, x in (("image", ref.images), ("text", ref.texts)):
                nb = self._neighbours(x, m, exclude_ids=ref.ids)
                reco[m], mean[m] = self._fuse(m, x, nb)[0], mean_fusion(x, nb.vectors, nb.mask)
            cache = _GateCache(ref, GateScale.spread(reco["image"] @ reco["text"].T),
                               GateScale.spread(mean["image"] @ mean["text"].T),
                               GATE_FLOOR * GateScale.spread(ref.images @ ref.texts.T))
        if cache.prompts is not raw:
            cache = cache._replace(prompts=raw, scale=GateScale.from_reference(
                cache.reco_spread, cache.mean_spread, ref.images @ raw.T, cache.encoder_floor))
        self._gate_cache = cache
        return cache.scale

    def _fuse(self, modality: str, q: np.ndarray, nb: Neighbours, need_weights: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """(refined [B, d], weights of [query, neighbours] [B, 1 + k] or None) by the fusion in use."""
        return self.refiner_.refine_numpy(modality, q, nb.vectors, nb.mask, need_weights=need_weights,
                                              scores=nb.scores, searched=nb.searched_vectors)

    # ------------------------------------------------------------------ classes
    @property
    def classes_(self) -> list[str]:
        """The class names given, in the order of the probabilities' columns."""
        return self._classes[0]

    @property
    def raw_class_embeddings_(self) -> np.ndarray | None:
        """[C, d] the class prompts' embeddings as given."""
        return self._classes[1]

    @property
    def class_embeddings_(self) -> np.ndarray | None:
        """[C, d] the class prompts refined by the fusion (as given without retrieval)."""
        return self._classes[2]

    def set_class_embeddings(self, class_embeddings: np.ndarray, class_names: Sequence[str]) -> RecoClassifier:
        """Use precomputed class-prompt embeddings [C, d]; each is refined once and cached."""
        if len(class_names) != len(class_embeddings):
            raise ValueError(f"{len(class_names)} class names for {len(class_embeddings)} class embeddings")
        names = list(class_names)
        x = validate_embeddings(class_embeddings, "class embeddings", None, "classes")
        if not self.use_retrieval:
            self._classes = (names, x, x, None)
            return self
        nb = self._neighbours(x, "text")  # checks x against the memory's dimension first
        adapted = self.fusion.adapted_to(x)
        self.adapted_share_ = float(adapted.mean()) if len(x) else 0.0
        if self.weights == "adapted" and not adapted.all():
            warnings.warn(f"{int((~adapted).sum())} of the {len(x)} classes given (e.g. "
                          f"{names[int(np.flatnonzero(~adapted)[0])]!r}) are not among the "
                          f"{self.fusion.cfg.adapted_classes} classes these adapted weights were trained on; "
                          "RecoClassifier(weights='zero-shot') is the model for new classes", stacklevel=2)
        self.alignment_ = cross_alignment(x, nb.vectors, nb.mask)
        trained = self.fusion.cfg.alignment
        if trained is not None and trained > 0 and self.alignment_ < ALIGNMENT_WARNING * trained:
            warnings.warn(f"the encoder aligns these {len(x)} class prompts with their retrieved neighbours far less "
                          f"than the classes the fusion was trained with (median cosine {self.alignment_:.2f} "
                          f"against {trained:.2f}): it may not know these names, and no fusion can make up for "
                          "that; check the prompts, or use an encoder that knows them", stacklevel=2)
        mean = mean_fusion(x, nb.vectors, nb.mask)  # for the gate (cheap: the same neighbours, no search)
        self._classes = (names, x, self._fuse("text", x, nb)[0], mean)  # last, whole: see __init__
        return self

    def set_classes(self, class_names: Sequence[str], templates: Sequence[str] | str = "generic") -> RecoClassifier:
        """Embed each class with every template (averaged), refine once, cache."""
        self._need_encoder("set_classes")
        if isinstance(templates, str):
            if templates in TEMPLATES:
                templates = TEMPLATES[templates]
            elif "{" in templates:
                templates = [templates]  # one template of the user's own
            else:
                raise ValueError(f"unknown template set {templates!r}: expected one of {sorted(TEMPLATES)} "
                                 "or a template with one '{}' placeholder")
        templates = list(templates)
        for t in templates:
            check_template(t)
        prompts = [t.format(c) for c in class_names for t in templates]
        emb = self.encoder.encode_texts(prompts).reshape(len(class_names), len(templates), -1).mean(1)
        return self.set_class_embeddings(emb, class_names)

    # ------------------------------------------------------------------ prediction
    def _check_ready(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
        """The class list (names, prompts, refined, mean-fused), read once for a whole prediction."""
        classes = self._classes
        if classes[2] is None:
            raise ValueError("no classes: call set_classes or set_class_embeddings first")
        return classes

    def predict_proba_embeddings(self, image_embeddings: np.ndarray) -> np.ndarray:
        """Image embeddings [B, d] -> class probabilities [B, C]."""
        return self._proba(image_embeddings)[1]

    def _proba(self, image_embeddings: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(the class names scored, probabilities [B, C]) of image embeddings [B, d], on one class list."""
        names, raw, cls, mean_cls = self._check_ready()
        x = validate_embeddings(image_embeddings, "image embeddings", None, "query")
        if not self.use_retrieval:
            return names, _softmax(BASELINE_SCALE * x @ cls.T)
        # the temperature the refining model learned with these very scores
        scale = float(self.refiner_.logit_scale.exp().clamp(max=100).item())
        ref = self._read_coverage() if self.gate == "coverage" else None
        gs = None if ref is None else self._gate_scale(ref, raw)
        out = []
        for q, nb, refined in self._refined_batches(x, "image"):
            scores = refined @ cls.T
            if gs is not None:
                scores = gs.mix(scores, mean_fusion(q, nb.vectors, nb.mask) @ mean_cls.T, q @ raw.T,
                                self._trust(q, nb, ref))
            logits = scale * scores
            out.append(_softmax(logits))
        return names, (np.concatenate(out) if out else np.zeros((0, len(cls)), np.float32))

    def predict_embeddings(self, image_embeddings: np.ndarray) -> list[str]:
        """Image embeddings [B, d] -> class names."""
        names, proba = self._proba(image_embeddings)
        return [names[i] for i in proba.argmax(1)]

    def _encode(self, images: Sequence[Any]) -> np.ndarray:
        return self._need_encoder("predicting from images").encode_images(list(images))

    def _need_encoder(self, what: str) -> Encoder:
        """The encoder given, else the one the memory records (loaded once), else a clear error."""
        if self.encoder is None:
            rec = self.memory.encoder_record if self.memory is not None else None
            if rec is None:
                raise ValueError(f"{what} needs an encoder (RecoClassifier(encoder=load_encoder(...))); "
                                 "use the *_embeddings methods for precomputed embeddings")
            self.encoder = encoder_from_record(rec)
        return self.encoder

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        """Images (paths or PIL) -> class probabilities [B, C]."""
        return self.predict_proba_embeddings(self._encode(images))

    def predict(self, images: Sequence[Any]) -> list[str]:
        """Images (paths or PIL) -> class names."""
        return self.predict_embeddings(self._encode(images))
