"""The coverage gate: an image's top search score ranked against the memory's own images', trust per image, and a
classifier that adds the plain encoder's evidence to RECO's by it, on real memories of the synthetic world."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from reco_qdrant import Memory, RecoClassifier, train_fusion
from reco_qdrant.coverage import BLEND, DEDUP, CoverageReference
from reco_qdrant.fusion import FusionConfig, FusionModel
from reco_qdrant.memory import point_id
from reco_qdrant.neighbors import retrieve
from reco_qdrant.synthetic import WorldConfig, make_world


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def world():
    """A synthetic world whose encoder knows every class name, if vaguely (the gate's use: the evidence it adds is
    the encoder's answer, here about as good as RECO's)."""
    return make_world(WorldConfig(rare_fraction=0.0, prompt_noise=0.6))


@pytest.fixture(scope="module")
def half(world, tmp_path_factory):
    """A memory lacking half of the evaluation classes (every pair showing one of them is left out), and the
    untrained relevance fusion over it."""
    tmp = tmp_path_factory.mktemp("coverage")
    absent = np.random.default_rng(0).permutation(world.eval_classes)[: len(world.eval_classes) // 2]
    keep = np.flatnonzero(~np.isin(world.memory_labels, absent))
    mem = Memory.open(str(tmp / "mem"))
    mem.add_embeddings(world.memory_image[keep], world.memory_text[keep], [world.memory_captions[i] for i in keep],
                       ids=[world.memory_ids[i] for i in keep], source="synthetic", encoder_id="synthetic")
    ids = [point_id("synthetic", k) for k in world.train_ids]
    model = train_fusion(mem, world.train_image, world.train_text, ids=ids, epochs=0, progress=False,
                         cache_dir=str(tmp / "c"), device="cpu")
    yield mem, model, absent
    mem.close()
    shutil.rmtree(tmp, ignore_errors=True)


def test_the_reference_is_read_from_the_memory_and_ranks_absent_concepts_low(world, half):
    mem, model, absent = half
    ref = CoverageReference.from_memory(mem, n=400)
    assert len(ref.image_top) == 400 and np.all(np.diff(ref.image_top) >= 0)
    assert ref.image_top[-1] < DEDUP  # each sampled image was searched without itself and its copies
    assert ref.fits(mem) and ref.memory_uid == mem.uid
    clf = RecoClassifier(mem, model, gate="coverage", coverage=ref)
    trust = clf.explain(world.eval_image).trust  # a reading of the image alone: no classes needed
    assert trust.shape == (len(world.eval_image),) and trust.min() >= 0 and trust.max() <= 1
    gone = np.isin(world.eval_labels, absent)
    # images of classes the memory holds are trusted; those of classes it lacks are doubted several times as often
    doubted = (trust[gone] < 1).mean(), (trust[~gone] < 1).mean()
    assert trust[~gone].mean() >= 0.9 and trust[gone].mean() <= trust[~gone].mean() - 0.1, (trust[gone].mean(),
                                                                                             trust[~gone].mean())
    assert doubted[0] >= 3 * doubted[1], doubted


def test_the_gate_adds_the_encoders_evidence_on_recos_scale(world, half):
    """The neighbours' evidence is RECO's scores with BLEND of mean fusion's (of the same neighbours) put on RECO's
    spread; a doubted image gets the encoder's scores added, standardised per class on the reference images and put in
    the spread of RECO's scores between the reference images and captions (each refined without its own pair): at
    trust 0, half of each. Recomputed here by hand, mean fusion by the `aggregator="mean"` model."""
    mem, model, _ = half
    meanf = FusionModel(FusionConfig(dim=model.cfg.dim, aggregator="mean"))
    names = [world.class_names[c] for c in world.eval_classes]
    prompts = world.class_text[world.eval_classes]
    x = world.eval_image[:200]
    gated = RecoClassifier(mem, model).set_class_embeddings(prompts, names)  # the gate is the default
    plain = RecoClassifier(mem, model, gate="none").set_class_embeddings(prompts, names)
    assert gated.gate == "coverage" and plain.gate == "none"
    p, p_plain = gated.predict_proba_embeddings(x), plain.predict_proba_embeddings(x)
    ref = gated.coverage_

    def fused(m, modality, q, exclude=None):
        nb = retrieve(mem, q, modality, model.cfg.k, exclude_ids=exclude, dedup_threshold=exclude and DEDUP,
                      with_searched_vectors=True)
        return m.refine_numpy(modality, q, nb.vectors, nb.mask, scores=nb.scores, searched=nb.searched_vectors)[0]

    spread, mean_spread = ((fused(m, "image", ref.images, ref.ids) @ fused(m, "text", ref.texts, ref.ids).T).std()
                           for m in (model, meanf))
    enc_ref = ref.images @ prompts.T
    gs = gated.gate_scale_
    assert gs.reco_spread == pytest.approx(spread, rel=1e-4) and gs.mean_spread == pytest.approx(mean_spread, rel=1e-4)
    np.testing.assert_allclose(gs.encoder_std, enc_ref.std(0), rtol=1e-4)
    w = gated.explain(x).trust
    assert (w == 1).mean() > 0.5 and (w < 0.5).any()  # both ends are exercised
    reco = plain.refine(x) @ plain.class_embeddings_.T
    np.testing.assert_allclose(p_plain, softmax(model.logit_scale.exp().item() * reco), rtol=2e-3, atol=1e-5)
    mean = fused(meanf, "image", x) @ fused(meanf, "text", prompts).T
    neighbours = (1 - BLEND) * reco + BLEND * spread / mean_spread * mean
    z_enc = (x @ prompts.T - enc_ref.mean(0)) / enc_ref.std(0)
    doubt = 0.5 * (1 - w[:, None])
    expect = softmax(model.logit_scale.exp().item() * ((1 - doubt) * neighbours + doubt * spread * z_enc))
    np.testing.assert_allclose(p, expect, rtol=2e-3, atol=1e-5)
    assert not np.allclose(p[w == 1], p_plain[w == 1], atol=1e-3)  # mean fusion counts for trusted images too
    assert plain.explain(x).trust is None and plain.coverage_ is None and plain.gate_scale_ is None
    assert gated.coverage_ is not None and gated.coverage_.fits(mem)
    gated.set_class_embeddings(prompts[:5], names[:5])  # a new class list is measured afresh
    assert gated.gate_scale_ is None and gated.predict_proba_embeddings(x[:3]).shape == (3, 5)
    assert len(gated.gate_scale_.encoder_mean) == 5 and gated.gate_scale_.reco_spread == gs.reco_spread
    with pytest.raises(ValueError, match="gate must be one of"):
        RecoClassifier(mem, model, gate="auto")
    with pytest.raises(ValueError, match="no sampled pairs"):
        RecoClassifier(mem, model, gate="coverage", coverage=CoverageReference(ref.image_top, mem.uid,
                       mem.write_version)).set_class_embeddings(prompts, names).predict_proba_embeddings(x[:2])


def test_the_gate_recovers_what_an_absent_class_costs(world, half):
    """On new classes half absent from the memory, RECO through the gate is above both RECO alone and the plain
    encoder (each about 86% here), by at least 10 of 960 images."""
    mem, model, _ = half
    names = [world.class_names[c] for c in world.eval_classes]
    prompts = world.class_text[world.eval_classes]
    y = np.searchsorted(world.eval_classes, world.eval_labels)

    def acc(clf):
        return float((clf.set_class_embeddings(prompts, names).predict_proba_embeddings(world.eval_image).argmax(1)
                      == y).mean())

    gated, alone = acc(RecoClassifier(mem, model)), acc(RecoClassifier(mem, model, gate="none"))
    base = acc(RecoClassifier(use_retrieval=False))
    assert gated >= max(alone, base) + 0.01, (gated, alone, base)


def test_a_memory_too_small_for_the_reference_is_refused(tmp_path):
    x = np.ones((1, 8), np.float32)
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(x, x, ["c0"], source="t", encoder_id="t")
        with pytest.raises(ValueError, match="at least 2 distinct images; this one holds 1 pair"):
            CoverageReference.from_memory(mem)
        mem.add_embeddings(x, x, ["c1"], source="t2", encoder_id="t")  # a copy: still nothing else to compare
        with pytest.raises(ValueError, match="none with a neighbour other than its own copies"):
            CoverageReference.from_memory(mem)
        # the default classifier scores such a memory without the gate, and says so; asked for, the gate refuses
        model = FusionModel(FusionConfig(dim=8, k=2, n_heads=2))
        prompts = np.eye(8, dtype=np.float32)[:3]
        clf = RecoClassifier(mem, model).set_class_embeddings(prompts, ["a", "b", "c"])
        with pytest.warns(UserWarning, match="scores without the coverage gate from now on"):
            p = clf.predict_proba_embeddings(prompts)
        expect = RecoClassifier(mem, model, gate="none").set_class_embeddings(prompts, ["a", "b", "c"])
        np.testing.assert_allclose(p, expect.predict_proba_embeddings(prompts), rtol=1e-6)
        assert clf.gate == "none"
        with pytest.raises(ValueError, match="distinct images"):
            RecoClassifier(mem, model, gate="coverage").set_class_embeddings(
                prompts, ["a", "b", "c"]).predict_proba_embeddings(prompts)


def test_each_class_is_scored_alone_and_the_gate_can_be_switched(world, half):
    """A class's score under the gate depends on that class alone: the same classes in reverse order give the same
    probabilities, columns reversed. A classifier set up without the gate can be switched to it afterwards."""
    mem, model, _ = half
    names = [world.class_names[c] for c in world.eval_classes]
    prompts = world.class_text[world.eval_classes]
    x = world.eval_image[:100]
    clf = RecoClassifier(mem, model, gate="none").set_class_embeddings(prompts, names)
    clf.gate = "coverage"
    p = clf.predict_proba_embeddings(x)
    np.testing.assert_allclose(p, RecoClassifier(mem, model).set_class_embeddings(prompts, names)
                               .predict_proba_embeddings(x), rtol=1e-5, atol=1e-7)
    q = clf.set_class_embeddings(prompts[::-1], names[::-1]).predict_proba_embeddings(x)
    np.testing.assert_allclose(q, p[:, ::-1], rtol=1e-4, atol=1e-6)
    assert clf.predict_embeddings(x[:5]) == [names[i] for i in p[:5].argmax(1)]


def test_the_gate_needs_retrieval_and_reads_again_after_a_write(world, half, tmp_path):
    mem, model, _ = half
    with pytest.raises(ValueError, match="needs retrieval"):
        RecoClassifier(use_retrieval=False, gate="coverage")
    assert RecoClassifier(use_retrieval=False).gate == "none"  # the default gate is there only with retrieval
    names = [world.class_names[c] for c in world.eval_classes]
    prompts = world.class_text[world.eval_classes]
    with Memory.open(str(tmp_path / "other")) as other:
        other.add_embeddings(world.memory_image[:40], world.memory_text[:40], [f"c{i}" for i in range(40)],
                             source="t", encoder_id="synthetic")
        with pytest.raises(ValueError, match="another memory"):
            RecoClassifier(mem, model, gate="coverage", coverage=CoverageReference.from_memory(other, n=20))
        # a reference goes stale with the memory it was read from: read again after a write that doubles it
        clf = RecoClassifier(other, model, gate="coverage").set_class_embeddings(prompts, names)
        clf.predict_proba_embeddings(world.eval_image[:5])
        first, scale = clf.coverage_, clf.gate_scale_
        other.add_embeddings(world.memory_image[40:80], world.memory_text[40:80], [f"c{i}" for i in range(40, 80)],
                             source="t", encoder_id="synthetic")
        clf.predict_proba_embeddings(world.eval_image[:5])
        assert clf.coverage_ is not first and clf.coverage_.fits(other) and not first.fits(other)
        # and so does the gate's scale, read on the new reference's pairs
        assert clf._gate_cache.reference is clf.coverage_ and clf.gate_scale_ is not scale
        assert len(clf.coverage_.ids) == 80 and clf.gate_scale_.reco_spread != scale.reco_spread
        # a write that moves the count by at most 5% keeps the reference (reading it is a pass over the memory)
        kept = clf.coverage_
        other.add_embeddings(world.memory_image[80:84], world.memory_text[80:84], [f"c{i}" for i in range(80, 84)],
                             source="t", encoder_id="synthetic")
        clf.predict_proba_embeddings(world.eval_image[:5])
        assert clf.coverage_ is kept and kept.fits(other) and kept.write_version != other.write_version


@pytest.mark.parametrize("mode", [dict(search="cross"), dict(fusion="uni")])
def test_the_gate_reads_the_same_figure_in_other_retrieval_modes(world, half, tmp_path, mode):
    """The reading is an image-to-image search score whatever mode the fusion retrieves in."""
    mem, model, _ = half
    other = train_fusion(mem, world.train_image[:400], world.train_text[:400], epochs=0, progress=False,
                         cache_dir=str(tmp_path / "c"), device="cpu", **mode)
    base = RecoClassifier(mem, model, gate="coverage")
    expect = base.explain(world.eval_image[:40]).trust
    got = RecoClassifier(mem, other, gate="coverage", coverage=base.coverage_).explain(world.eval_image[:40]).trust
    np.testing.assert_array_equal(got, expect)


def test_a_gated_classifier_shared_by_threads_never_mixes_two_class_lists(world, half):
    """Predictions running beside set_class_embeddings see one class list, old or new, with its own gate scale:
    the answers are those of one of the two lists, never an error or a mix."""
    import threading

    mem, model, _ = half
    names = [world.class_names[c] for c in world.eval_classes]
    prompts = world.class_text[world.eval_classes]
    lists = [(prompts, names), (prompts[::-1][:7], names[::-1][:7])]
    x = world.eval_image[:40]
    clf = RecoClassifier(mem, model, gate="coverage")
    expect = {len(n): clf.set_class_embeddings(p, n).predict_proba_embeddings(x) for p, n in lists}
    got, errors = [], []

    def predict() -> None:
        try:
            for _ in range(12):
                got.append(clf.predict_proba_embeddings(x))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=predict) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(24):
        clf.set_class_embeddings(*lists[i % 2])
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(got) == 24 and {p.shape[1] for p in got} <= set(expect)
    for p in got:
        np.testing.assert_allclose(p, expect[p.shape[1]], rtol=1e-4, atol=1e-6)


def test_the_reference_read_shows_its_progress_when_asked(world, half, capsys):
    """The first gated prediction reads the memory once (minutes at millions of pairs): `progress=True` shows it."""
    mem, model, _ = half
    names = [world.class_names[c] for c in world.eval_classes]
    clf = RecoClassifier(mem, model, progress=True).set_class_embeddings(world.class_text[world.eval_classes], names)
    clf.predict_proba_embeddings(world.eval_image[:2])
    assert "sampling pairs" in capsys.readouterr().err
    RecoClassifier(mem, model).set_class_embeddings(world.class_text[world.eval_classes],
                                                    names).predict_proba_embeddings(world.eval_image[:2])
    assert "sampling pairs" not in capsys.readouterr().err  # quiet by default, as in a library
