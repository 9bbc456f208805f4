"""Pseudo-classes for training without labels: spherical k-means on the training pairs.

Unlabelled web pairs still come in concepts. Grouping them lets training hide a whole concept from the
memory (so the fusion meets queries whose concept is absent, as new classes often are) and validate on
held-out concepts rather than held-out pairs, which is what zero-shot accuracy on new classes rewards.
"""

from __future__ import annotations

import numpy as np

MAX_CLUSTERS = 1024  # past this, clusters grow instead: each step refines every training cluster's prompt


def pseudo_classes(image_embeddings: np.ndarray, text_embeddings: np.ndarray, size: int, seed: int = 0,
                   iters: int = 20, fit_sample: int = 100_000, chunk: int = 8192, on: str = "both") -> np.ndarray:
    """[N] cluster index (0..K-1, none empty) of each pair (image [N, d], text [N, d], L2-normalised), about
    `size` pairs a cluster and at most `MAX_CLUSTERS` clusters.

    `on="both"`: clusters are found on both modalities at once (the pair's image and text vectors side by
    side), so a cluster holds pairs that look alike *and* are described alike. `on="image"`: on the images
    alone, so a cluster is a visual concept whose captions carry whatever noise the memory's captions carry.
    Centroids are fitted on at most
    `fit_sample` pairs (seeded by distance, k-means++ style, then Lloyd iterations), then every pair is
    assigned; similarities are computed `chunk` rows at a time, so the working memory beyond the [N, 2d]
    float32 input is O(chunk * K)."""
    if on == "both":
        x = np.concatenate([image_embeddings, text_embeddings], axis=1).astype(np.float32)
        x *= np.float32(1 / np.sqrt(2.0))
    elif on == "image":
        x = np.array(image_embeddings, np.float32)
    else:
        raise ValueError(f"on must be 'both' or 'image', got {on!r}")
    n = len(x)
    k = min(MAX_CLUSTERS, max(1, n // max(1, size)))
    if k == 1:
        return np.zeros(n, np.int64)
    rng = np.random.default_rng(seed)
    fit = x[rng.choice(n, min(n, fit_sample), replace=False)]
    centres = [fit[rng.integers(len(fit))]]
    best = fit @ centres[0]
    for _ in range(k - 1):  # seeding: each new centre is drawn among the pairs farthest from the chosen ones
        p = np.clip(1.0 - best.astype(np.float64), 0.0, None) ** 2
        c = fit[rng.choice(len(fit), p=p / p.sum()) if p.sum() > 0 else rng.integers(len(fit))]
        centres.append(c)
        best = np.maximum(best, fit @ c)
    c = np.stack(centres)
    for _ in range(iters):
        a = _assign(fit, c, chunk)
        sums = np.zeros_like(c)
        np.add.at(sums, a, fit)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        c = np.where(norms > 0, sums / np.clip(norms, 1e-12, None), c)  # an empty cluster keeps its centre
    return np.unique(_assign(x, c, chunk), return_inverse=True)[1].astype(np.int64)


def _assign(x: np.ndarray, centres: np.ndarray, chunk: int) -> np.ndarray:
    """[N] index of the nearest centre (highest dot product: cosine for unit rows) of each row of x [N, D], `chunk`
    rows at a time, so the scores held are [chunk, K], never [N, K]."""
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = (x[s:s + chunk] @ centres.T).argmax(1)
    return out


def medoids(text_embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[K] row of each cluster's medoid caption: the one closest to its cluster's mean (labels [N] in 0..K-1).

    One caption stands in for a class-name prompt: a single sentence, as a prompt is, where the mean of many
    captions would be a far better-aligned prototype than any prompt a user writes."""
    k = int(labels.max()) + 1
    sums = np.zeros((k, text_embeddings.shape[1]), np.float32)
    np.add.at(sums, labels, text_embeddings)
    cos = np.einsum("nd,nd->n", text_embeddings, sums[labels])
    order = np.lexsort((-cos, labels))  # by cluster, best first
    first = np.ones(len(order), bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    return order[first]
