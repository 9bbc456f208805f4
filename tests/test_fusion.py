"""The fusion models on their own: shapes, masking, the relevance fusion's start at mean fusion, its
use of the search scores, and the retrieval pieces training relies on (searched vectors, class-out exclusion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_pairs

from reco_qdrant import Memory
from reco_qdrant.fusion import AGGREGATORS, FusionConfig, FusionModel, cross_alignment
from reco_qdrant.neighbors import retrieve
from reco_qdrant.training import class_members, search_scores


def batch(b=6, k=5, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    r = torch.nn.functional.normalize(torch.randn(b, k, d, generator=g), dim=-1)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2] = False  # no neighbour at all
    scores = torch.rand(b, k, generator=g).masked_fill(~mask, float("-inf"))
    return q, r, mask, scores


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_shapes_norms_and_weights(aggregator):
    model = FusionModel(FusionConfig(dim=32, k=5, n_heads=4, aggregator=aggregator)).eval()
    q, r, mask, scores = batch()
    out, w = model.refine("image", q, r, mask, need_weights=True, scores=scores, searched=r)
    assert out.shape == (6, 32) and w.shape == (6, 6)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(w.sum(1), torch.ones(6))
    assert (w[:, 1:][~mask] == 0).all()  # padded neighbours get no weight


def test_relevance_fusion_starts_as_plain_averaging_exactly():
    """Untrained: the query plus the normalised mean neighbour of the fused modality (mean fusion exactly)
    and, with the searched modality's term, plus that modality's normalised mean neighbour too."""
    cfg = dict(dim=32, k=5, n_heads=4)
    mean = FusionModel(FusionConfig(aggregator="mean", **cfg)).eval()
    q, r, mask, scores = batch()
    keys = torch.nn.functional.normalize(torch.randn_like(r), dim=-1)
    rel = FusionModel(FusionConfig(aggregator="relevance", uni_term=False, **cfg)).eval()
    torch.testing.assert_close(rel.refine("image", q, r, mask, scores=scores)[0],
                               mean.refine("image", q, r, mask, scores=scores)[0])
    both = FusionModel(FusionConfig(aggregator="relevance", **cfg)).eval()
    assert both.needs_searched_vectors and not rel.needs_searched_vectors
    with pytest.raises(ValueError, match="searched"):
        both.refine("image", q, r, mask, scores=scores)
    m = mask.float()[..., None]
    norm = torch.nn.functional.normalize
    want = norm(q + norm((r * m).sum(1), dim=-1) + norm((keys * m).sum(1), dim=-1), dim=-1)
    a, _ = both.refine("image", q, r, mask, scores=scores, searched=keys)
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(a[2], q[2])  # nothing retrieved: the query itself


def test_the_map_on_the_searched_modality_starts_at_zero_and_the_adapted_weights_keep_their_own_config(tmp_path):
    """`uni_projection` adds a D x D map on U, zero at first (the same output as without it); a model whose
    `adapted` weights have it while its own do not saves and loads both as they are."""
    cfg = dict(dim=32, k=5, n_heads=4)
    q, r, mask, scores = batch()
    keys = torch.nn.functional.normalize(torch.randn_like(r), dim=-1)
    plain = FusionModel(FusionConfig(**cfg)).eval()
    mapped = FusionModel(FusionConfig(uni_projection=True, **cfg)).eval()
    missing = mapped.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["phi_img.uni_proj.weight", "phi_txt.uni_proj.weight"] and plain.phi_img.uni_proj is None
    torch.testing.assert_close(mapped.refine("image", q, r, mask, scores=scores, searched=keys)[0],
                               plain.refine("image", q, r, mask, scores=scores, searched=keys)[0])
    with torch.no_grad():
        mapped.phi_img.uni_proj.weight.normal_(std=0.5)
    want = mapped.refine("image", q, r, mask, scores=scores, searched=keys)[0]
    assert (want - plain.refine("image", q, r, mask, scores=scores, searched=keys)[0]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="needs uni_term=True"):
        FusionConfig(uni_projection=True, uni_term=False, **cfg)
    both = plain.with_adapted(mapped, np.eye(3, 32, dtype=np.float32))
    assert both.cfg.adapted_uni_projection and both.phi_img.uni_proj is None and both.adapted.cfg.uni_projection
    loaded = FusionModel.from_pretrained(both.save_pretrained(tmp_path / "both"))
    assert loaded.cfg == both.cfg and loaded.adapted.cfg == mapped.cfg
    torch.testing.assert_close(loaded.adapted.refine("image", q, r, mask, scores=scores, searched=keys)[0], want)


def test_relevance_fusion_needs_scores_and_uses_them():
    model = FusionModel(FusionConfig(dim=32, k=5, aggregator="relevance")).eval()
    q, r, mask, scores = batch()
    with pytest.raises(ValueError, match="needs the neighbours' search scores"):
        model.refine("image", q, r, mask)
    with torch.no_grad():
        model.phi_img.score_scale.fill_(50.0)  # trust the best-matching neighbour
    _, w = model.refine("image", q, r, mask, need_weights=True, scores=scores, searched=r)
    best = scores.masked_fill(~mask, -1).argmax(1)
    has = mask.any(1)
    assert (w[:, 1:].argmax(1)[has] == best[has]).all()


def test_search_returns_searched_vectors_and_class_out_retrieval_skips_the_class(tmp_path):
    img, txt, caps = random_pairs(120, seed=4)
    labels = np.repeat(np.arange(12), 10)
    img = img + 2.0 * np.repeat(random_pairs(12, seed=5)[0], 10, axis=0)  # items of a class cluster together
    with Memory.open(str(tmp_path / "m")) as mem:
        ids = mem.add_embeddings(img, txt, caps, ids=list(range(120)))
        nb = retrieve(mem, img[:8], "image", 5, with_searched_vectors=True)
        q = img[:8] / np.linalg.norm(img[:8], axis=1, keepdims=True)
        np.testing.assert_allclose(search_scores(q, nb.searched_vectors, nb.mask), nb.scores, atol=1e-5)
        members = class_members(ids, labels)
        out = retrieve(mem, img[:8], "image", 5, exclude_ids=[members[c] for c in labels[:8]],
                       with_searched_vectors=True)
        assert out.mask.all()
        got = {i: int(labels[ids.index(i)]) for i in out.ids.ravel()}
        assert all(got[i] != labels[row] for row in range(8) for i in out.ids[row])
        assert (nb.scores[:, 0] > out.scores[:, 0]).all()  # what is left of the ranking matches less well


def test_the_gate_reads_the_cross_modal_cosine_and_older_checkpoints_still_load(tmp_path):
    """The gate sees the query's cosine with its fused neighbours (6 features); a checkpoint written before
    that and the searched modality's term (config without `cross_feature`/`uni_term`) loads as trained."""
    import json

    q, r, mask, scores = batch()
    model = FusionModel(FusionConfig(dim=32, k=5, n_heads=4)).eval()
    feats = model.phi_img.features(q, r, mask, scores)
    assert feats.shape == (len(q), 6)
    mean = torch.nn.functional.normalize((r * mask[..., None]).sum(1), dim=-1)
    torch.testing.assert_close(feats[:, 5], (q * mean).sum(1))
    old = FusionModel(FusionConfig(dim=32, k=5, n_heads=4, cross_feature=False, uni_term=False)).eval()
    path = old.save_pretrained(tmp_path / "old")
    cfg = json.loads((path / "config.json").read_text())
    for field in ("cross_feature", "uni_term", "alignment", "uni_projection", "adapted_uni_projection"):
        cfg.pop(field)
    (path / "config.json").write_text(json.dumps(cfg))
    loaded = FusionModel.from_pretrained(path)
    assert loaded.cfg.cross_feature is False and loaded.phi_img.gate[0].in_features == 5
    assert loaded.cfg.uni_term is False and not loaded.needs_searched_vectors
    torch.testing.assert_close(loaded.refine("image", q, r, mask, scores=scores)[0],
                               old.refine("image", q, r, mask, scores=scores)[0])


def test_cross_alignment_reads_the_classes_whose_neighbours_agree():
    """Half of the queries retrieve neighbours close to them (a class the memory holds), half scattered ones
    (a class it lacks, whose prompt finds look-alikes): the alignment is that of the first half, not a median
    dragged down by the memory's coverage (over all queries it would be about 0.5)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((40, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    near = q[:20, None] + 0.1 * rng.standard_normal((20, 8, 64))
    scattered = rng.standard_normal((20, 8, 64))
    vectors = np.concatenate([near, scattered]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    mask = np.ones((40, 8), bool)
    whole = cross_alignment(q, vectors, mask)
    assert whole > 0.9
    assert cross_alignment(q[:20], vectors[:20], mask[:20]) == pytest.approx(whole, abs=0.05)
    assert cross_alignment(q[20:], vectors[20:], mask[20:]) < 0.3
