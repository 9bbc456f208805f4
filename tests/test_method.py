"""RECO on the synthetic world: beats the baseline widely, ablations order as in the paper,
self-exclusion matters, checkpoints round-trip, the memory can be swapped at inference."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from reco_qdrant import FusionModel, Memory, RecoClassifier, train_fusion
from reco_qdrant.evaluation import zero_shot_report
from reco_qdrant.memory import point_id
from reco_qdrant.neighbors import retrieve


def fill(mem, w, rows=None):
    rows = np.arange(len(w.memory_ids)) if rows is None else rows
    mem.add_embeddings(w.memory_image[rows], w.memory_text[rows], [w.memory_captions[i] for i in rows],
                       ids=[w.memory_ids[i] for i in rows], source="synthetic", encoder_id="synthetic")
    return mem


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("method")
    mem = fill(Memory.open(str(tmp / "mem")), world)
    ids = [point_id("synthetic", k) for k in world.train_ids]
    names = [world.class_names[c] for c in world.eval_classes]
    labels = np.searchsorted(world.eval_classes, world.eval_labels)

    def run(model=None, gate=None, **kw):
        """Train (unless `model` is given) and score on the new classes with the classifier's default gate, or
        `gate="none"`: the fusion alone, for comparisons between fusions."""
        model = model or train_fusion(mem, world.train_image, world.train_text, labels=world.train_labels,
                                      class_embeddings=world.class_text, ids=ids, progress=False,
                                      cache_dir=str(tmp / "c"), device="cpu", **kw)
        clf = RecoClassifier(mem, model, gate=gate).set_class_embeddings(world.class_text[world.eval_classes], names)
        return model, clf, zero_shot_report(clf, world.eval_image, labels)

    yield mem, run, names, labels, tmp
    mem.close()
    shutil.rmtree(tmp, ignore_errors=True)  # module data outlives pytest's per-test retention


@pytest.fixture(scope="module")
def reco(setup):
    return setup[1]()


def test_reco_beats_baseline_by_25_points(reco):
    _, _, res = reco
    assert res["reco"]["top1"] >= res["baseline"]["top1"] + 0.25, res


def test_reco_is_at_least_mean_fusion(setup, reco):
    """The default fusion starts at mean fusion and leaves it only where validation (held-out classes,
    some of them treated as absent from the memory) says it helps: never below it on this world, alone or as the
    classifier scores it by default."""
    _, _, mean = setup[1](aggregator="mean", gate="none")
    _, _, alone = setup[1](reco[0], gate="none")
    assert min(reco[2]["reco"]["top1"], alone["reco"]["top1"]) >= mean["reco"]["top1"], (reco[2], alone, mean)


def test_no_alignment_warning_where_the_encoder_knows_the_classes(reco):
    model, clf, _ = reco
    assert clf.refiner_ is model
    assert model.cfg.alignment is not None and clf.alignment_ > 0.5 * model.cfg.alignment


def test_names_the_encoder_does_not_know_are_reported_not_rescored(world, setup, reco, tmp_path):
    """An encoder that never learned the evaluation classes' names: their captions and prompts are turned by
    one random orthogonal map (text-text cosines, so the searches, unchanged; image-text ones scrambled). The
    classifier warns with the measured alignment and what to do, and keeps scoring as it was asked to: the
    same model, the same refined scores, as with classes it knows."""
    model = reco[0]
    rot, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((world.memory_text.shape[1],) * 2))
    turned = np.isin(world.memory_labels, world.eval_classes)
    text = world.memory_text.copy()
    text[turned] = text[turned] @ rot
    names = setup[2]
    prompts = world.class_text[world.eval_classes] @ rot
    with Memory.open(str(tmp_path / "mem")) as mem:
        mem.add_embeddings(world.memory_image, text, world.memory_captions, ids=world.memory_ids,
                           source="synthetic", encoder_id="synthetic")
        with pytest.warns(UserWarning, match=r"median cosine 0\.\d+ against 0\.\d+.*may not know these names"):
            clf = RecoClassifier(mem, model, gate="none").set_class_embeddings(prompts, names)
        assert clf.refiner_ is model and clf.alignment_ < 0.5 * model.cfg.alignment
        x = world.eval_image[:20]
        want = (clf.refine(x) @ clf.class_embeddings_.T).argmax(1)
        assert [names.index(c) for c in clf.predict_embeddings(x)] == want.tolist()


def test_a_half_covered_memory_does_not_read_as_unknown_names(world, setup, reco, tmp_path):
    """Three quarters of the evaluation classes missing from the memory, as from a web memory: their captions
    only on other classes' images (wrong captions), so their prompts retrieve scattered images and align with
    them poorly. The encoder still knows every name: no warning (the alignment is measured on the classes
    whose neighbours agree; over all classes it read 0.17 here, below half of the training classes' 0.37)."""
    import warnings

    model = reco[0]
    rng = np.random.default_rng(0)
    absent = rng.permutation(world.eval_classes)[: 3 * len(world.eval_classes) // 4]
    out = np.isin(world.memory_labels, absent)
    image = world.memory_image.copy()
    image[out] = world.memory_image[rng.choice(np.flatnonzero(~out), out.sum())]
    with Memory.open(str(tmp_path / "mem")) as mem:
        mem.add_embeddings(image, world.memory_text, world.memory_captions, ids=world.memory_ids,
                           source="synthetic", encoder_id="synthetic")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            clf = RecoClassifier(mem, model).set_class_embeddings(world.class_text[world.eval_classes], setup[2])
    assert clf.alignment_ >= 0.5 * model.cfg.alignment, (clf.alignment_, model.cfg.alignment)


def test_the_classifier_does_not_change_with_the_number_of_classes_given(world, setup, reco):
    """Nothing switches models or scores by the class list: 10 trained + 10 new classes, or one more new class,
    refine the same images and the same classes identically, so the ranking among the same 20 is unchanged, with
    the coverage gate too (it reads the image alone)."""
    mem = setup[0]
    model = reco[0]
    trained = np.unique(world.train_labels)[:10]
    for weights, gate in (("zero-shot", "none"), ("adapted", "none"), ("zero-shot", "coverage"),
                          ("adapted", "coverage")):
        outs = []
        for n_new in (10, 11):
            cls = np.concatenate([trained, world.eval_classes[:n_new]])
            clf = RecoClassifier(mem, model, weights=weights, gate=gate)
            with pytest.warns(UserWarning, match="not among") if weights == "adapted" else _no_warning():
                clf.set_class_embeddings(world.class_text[cls], [world.class_names[c] for c in cls])
            p = clf.predict_proba_embeddings(world.eval_image[:30])
            outs.append((clf.refine(world.eval_image[:30]), clf.class_embeddings_[:20], p[:, :20].argsort(1),
                         clf.explain(world.eval_image[:30]).trust))
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
        np.testing.assert_array_equal(outs[0][1], outs[1][1])
        np.testing.assert_array_equal(outs[0][2], outs[1][2])
        if gate == "none":
            assert outs[0][3] is None and outs[1][3] is None
        else:
            np.testing.assert_array_equal(outs[0][3], outs[1][3])


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    return ctx()


def test_the_searched_modality_term_can_be_left_out(setup):
    """`uni_term=False`: relevance fusion without U, whose classifier then searches without the keys (the
    hits' vectors in the searched modality, which cost about 40% more search time)."""
    model, clf, res = setup[1](uni_term=False, epochs=1)
    assert model.cfg.uni_term is False and not model.needs_searched_vectors and model.phi_img.uni_scale is None
    assert model.adapted is not None and not model.adapted.cfg.uni_projection  # no U, nothing for Q to map
    assert res["reco"]["top1"] >= res["baseline"]["top1"] + 0.25, res


def test_the_paper_transformer_stays_selectable(setup, reco):
    model, _, res = setup[1](aggregator="transformer")
    assert model.cfg.aggregator == "transformer"
    assert res["reco"]["top1"] >= res["baseline"]["top1"] + 0.25, res


@pytest.mark.parametrize("mode", [dict(search="cross"), dict(fusion="uni")])
def test_ablations_are_clearly_worse(setup, reco, mode):
    _, _, res = setup[1](gate="none", **mode)
    _, _, alone = setup[1](reco[0], gate="none")
    assert res["reco"]["top1"] <= alone["reco"]["top1"] - 0.2, (mode, res)


def test_self_exclusion_prevents_copying(world, tmp_path):
    """All training pairs in the memory, no early stopping: without self-exclusion the paper's transformer
    learns to copy its own caption (training loss collapses) and does worse on unseen classes. (The default
    relevance fusion, a gate and a few scalars over the neighbours, has little room to copy: measured on
    this world, its loss falls to 0.59x without exclusion and accuracy does not drop. Exclusion stays on
    for every aggregator: a query's own caption is never among its neighbours at inference.)"""
    from reco_qdrant.synthetic import make_world

    w = make_world(train_in_memory_fraction=1.0)
    with fill(Memory.open(str(tmp_path / "m")), w) as mem:
        ids = [point_id("synthetic", k) for k in w.train_ids]
        names = [w.class_names[c] for c in w.eval_classes]
        labels = np.searchsorted(w.eval_classes, w.eval_labels)
        out = {}
        for ex in (True, False):
            m = train_fusion(mem, w.train_image, w.train_text, ids=ids, epochs=10, val_fraction=0, self_exclusion=ex,
                             progress=False, cache_dir=str(tmp_path / "c"), device="cpu", aggregator="transformer",
                             swap_fraction=0.0, pseudo_class_size=0)  # swaps and the pseudo-class loss also
            # counter copying: test exclusion alone
            clf = RecoClassifier(mem, m).set_class_embeddings(w.class_text[w.eval_classes], names)
            out[ex] = (m.history[-1]["loss"], zero_shot_report(clf, w.eval_image, labels)["reco"]["top1"])
        nb = retrieve(mem, w.train_image[:50], "image", 10, exclude_ids=ids[:50], dedup_threshold=0.98)
        assert (nb.ids != np.array(ids[:50])[:, None]).all() and nb.mask.all()  # never itself, still k
    assert out[False][0] < 0.5 * out[True][0], out  # copying makes the task trivial
    assert out[False][1] <= out[True][1] - 0.08, out


def test_checkpoint_roundtrip_is_exact_and_pickle_free(setup, reco, tmp_path):
    mem, _, names, labels, _ = setup
    model, clf, _ = reco
    path = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = FusionModel.from_pretrained(path)
    clf2 = RecoClassifier(mem, loaded).set_class_embeddings(clf.raw_class_embeddings_, names)
    np.testing.assert_array_equal(clf2.refine(clf.raw_class_embeddings_[:5], "text"),
                                  clf.refine(clf.raw_class_embeddings_[:5], "text"))
    probe = np.random.default_rng(0).standard_normal((20, model.cfg.dim)).astype(np.float32)
    assert clf.predict_embeddings(probe) == clf2.predict_embeddings(probe)
    # probabilities agree to float32 rounding (BLAS may sum in another order for other buffers)
    np.testing.assert_allclose(clf.predict_proba_embeddings(probe), clf2.predict_proba_embeddings(probe),
                               rtol=1e-5, atol=1e-7)


def test_the_classes_trained_on_are_scored_by_the_adapted_weights_when_asked(world, setup, reco, tmp_path):
    """Early stopping picks the epoch for classes the model never saw; a model trained with labels also holds
    weights trained on every labelled class for the full schedule (`adapted`): the classifier uses them only
    when asked (`weights="adapted"`), and warns about classes they were not adapted to."""
    mem, run, names, _, _ = setup
    model, clf, _ = reco
    assert model.adapted is not None and model.adapted.adapted is None
    # only the weights for the classes trained on learn the map on U (`adapted_uni_projection`), and they did learn it
    assert model.phi_img.uni_proj is None and model.adapted.cfg.uni_projection and model.cfg.adapted_uni_projection
    assert model.adapted.phi_img.uni_proj.weight.abs().max() > 0
    assert model.history[-1]["epoch"] < 30  # stopped early for new classes
    assert model.cfg.adapted_classes == len(model.class_prompts) == len(np.unique(world.train_labels))
    learned = model.adapted_to(world.class_text)
    assert learned.sum() == model.cfg.adapted_classes and not learned[world.eval_classes].any()
    assert clf.refiner_ is model and clf.adapted_share_ == 0.0  # the evaluation classes are new ones
    seen_names = [world.class_names[c] for c in np.flatnonzero(learned)]
    default = RecoClassifier(mem, model).set_class_embeddings(world.class_text[learned], seen_names)
    assert default.refiner_ is model and default.adapted_share_ == 1.0  # never switched silently
    on_seen = RecoClassifier(mem, model, weights="adapted").set_class_embeddings(world.class_text[learned], seen_names)
    assert on_seen.refiner_ is model.adapted
    a, b = (on_seen.refine(world.eval_image[:8], "image"), clf.refine(world.eval_image[:8], "image"))
    assert np.abs(a - b).max() > 1e-3  # other weights refine
    half = np.concatenate([np.flatnonzero(learned)[:3], world.eval_classes[:4]])
    with pytest.warns(UserWarning, match="4 of the 7 classes given .* are not among the"):
        RecoClassifier(mem, model, weights="adapted").set_class_embeddings(world.class_text[half],
                                                                           [str(c) for c in half])
    with pytest.raises(ValueError, match="weights must be one of"):
        RecoClassifier(mem, model, weights="seen")
    loaded = FusionModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.cpu(), rtol=0, atol=0)
    assert RecoClassifier(mem, loaded, weights="adapted").set_class_embeddings(
        world.class_text[learned], seen_names).refiner_ is loaded.adapted
    without, _, _ = run(adapted_model=False)
    assert without.adapted is None
    with pytest.raises(ValueError, match="weights='adapted' needs a fusion model adapted"):
        RecoClassifier(mem, without, weights="adapted")
    for k, v in without.state_dict().items():  # the early-stopped model is the same either way
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_checkpoint_for_another_dim_or_mode_is_refused(setup, tmp_path):
    from reco_qdrant.fusion import FusionConfig
    from reco_qdrant.memory import EncoderMismatchError

    mem = setup[0]
    FusionModel(FusionConfig(dim=32, n_heads=8)).save_pretrained(tmp_path / "wide")
    with pytest.raises(EncoderMismatchError, match="fusion model is 32-d, memory holds 64-d"):
        RecoClassifier(mem, FusionModel.from_pretrained(tmp_path / "wide"))
    cfg = (tmp_path / "wide" / "config.json")
    cfg.write_text(cfg.read_text().replace('"fusion": "cross"', '"fusion": "sideways"'))
    with pytest.raises(ValueError, match="fusion must be one of"):
        FusionModel.from_pretrained(tmp_path / "wide")
    FusionModel(FusionConfig(dim=64, encoder_id="open_clip/RN50/openai")).save_pretrained(tmp_path / "other")
    with pytest.raises(EncoderMismatchError, match="trained on 'open_clip/RN50/openai'"):
        RecoClassifier(mem, FusionModel.from_pretrained(tmp_path / "other"))


def test_another_memory_at_inference(world, reco, tmp_path):
    """Train on one memory, predict with a different one (half of the pairs, another store)."""
    model, clf, res = reco
    names = [world.class_names[c] for c in world.eval_classes]
    labels = np.searchsorted(world.eval_classes, world.eval_labels)
    with fill(Memory.open(":memory:"), world, rows=np.arange(1, len(world.memory_ids), 2)) as other:
        clf2 = RecoClassifier(other, model).set_class_embeddings(world.class_text[world.eval_classes], names)
        res2 = zero_shot_report(clf2, world.eval_image, labels)
    assert res2["reco"]["top1"] >= res2["baseline"]["top1"] + 0.25, res2


@pytest.mark.slow
def test_killed_training_resumes_exactly(world, tmp_path):
    """SIGKILL a training process after a checkpoint, resume it, and match an uninterrupted run bit for bit."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_method import fill
from reco_qdrant import Memory, train_fusion
from reco_qdrant.synthetic import make_world
w = make_world()
with fill(Memory.open({str(tmp_path / 'm')!r}), w) as mem:
    train_fusion(mem, w.train_image, w.train_text, labels=w.train_labels, class_embeddings=w.class_text,
                 epochs=4, patience=100, out_dir={str(tmp_path / 'a')!r}, cache_dir={str(tmp_path / 'c')!r},
                 progress=False, device="cpu")
"""
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (tmp_path / "a" / "last" / "trainer_state.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
    kw = dict(labels=world.train_labels, class_embeddings=world.class_text, epochs=4, patience=100,
              cache_dir=str(tmp_path / "c"), progress=False, device="cpu")
    with Memory.open(str(tmp_path / "m")) as mem:
        resumed = train_fusion(mem, world.train_image, world.train_text, out_dir=str(tmp_path / "a"), **kw)
        clean = train_fusion(mem, world.train_image, world.train_text, out_dir=str(tmp_path / "b"), **kw)
    assert resumed.history[-1]["epoch"] == 4 and len(resumed.history) == 5
    for part in ("last", "best"):
        a = load_file(str(tmp_path / "a" / part / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / part / "model.safetensors"))
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    for k, v in clean.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    with Memory.open(str(tmp_path / "m")) as mem:  # a finished run resumed: nothing to train, the same model
        again = train_fusion(mem, world.train_image, world.train_text, out_dir=str(tmp_path / "a"), **kw)
    assert again.adapted is not None and again.state_dict().keys() == clean.state_dict().keys()
    for k, v in clean.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_templates_and_unknown_placeholder(tiny_encoder):
    clf = RecoClassifier(encoder=tiny_encoder, use_retrieval=False)
    with pytest.raises(ValueError, match=r"exactly one '\{\}' placeholder.*\{name\}"):
        clf.set_classes(["a", "b"], ["a photo of a {name}."])
    clf.set_classes(["cardinal", "blue jay"], "birds")
    assert clf.class_embeddings_.shape == (2, tiny_encoder.dim)


def test_fp32_and_bf16_training_both_learn(setup):
    """Both precisions train (bf16 autocast is the default where the chip has fast bf16; fp32 elsewhere)."""
    from reco_qdrant.training import use_bf16

    _, run, *_ = setup
    scores = {}
    for precision in ("fp32", "bf16"):
        model, _, res = run(precision=precision, epochs=3, patience=10)
        scores[precision] = res["reco"]["top1"]
        assert res["reco"]["top1"] >= res["baseline"]["top1"] + 0.25, (precision, res)
    assert abs(scores["fp32"] - scores["bf16"]) < 0.1, scores
    assert use_bf16("fp32", "cpu") is False and use_bf16("bf16", "cpu") is True
    assert use_bf16("auto", "cpu", dim=64) is False  # too narrow to gain
    with pytest.raises(ValueError, match="precision must be"):
        use_bf16("fp8", "cpu")


@pytest.mark.parametrize("search", ["uni", "cross"])
def test_neighbour_cache_from_vector_columns_equals_the_per_hit_vectors(setup, world, tmp_path, search):
    from reco_qdrant.training import TrainConfig, neighbour_cache

    mem = setup[0]
    ids = [point_id("synthetic", k) for k in world.train_ids]
    cfg = TrainConfig(cache_dir=str(tmp_path), progress=False, search=search)
    n_few = mem.count() // cfg.k  # few queries: the engine returns each hit's vectors
    few = neighbour_cache(mem, world.train_image[:n_few], "image", cfg, ids[:n_few], columns=False)
    many = neighbour_cache(mem, world.train_image, "image", cfg, ids, columns=True)  # ids only, gathered by id
    for a, b in zip(few, many):
        # the same vectors stored as float16, up to one float16 step (a handful of values, 9 of 641,920 when
        # this was written, round the other way)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b[:n_few], np.float32), rtol=1e-3, atol=1e-4)
    assert few[2].all()  # every query found k neighbours besides its own pair


def test_class_prompts_never_retrieve_the_images_being_scored(setup, world):
    """In training and validation, the images being scored are points of the memory; a class prompt's
    neighbours leave them out (as at test time, where a test image is never in the memory) and still
    number k, in rank order."""
    from reco_qdrant.prompts import _Prompts
    from reco_qdrant.training import TrainConfig

    mem = setup[0]
    cfg = TrainConfig(progress=False)
    classes = np.unique(world.train_labels)[:6]
    prompts = _Prompts(mem, cfg, classes, world.class_text, world.train_text, world.train_labels, exclusion=True)
    plain = retrieve(mem, prompts.emb, "text", 2 * cfg.k, with_searched_vectors=True, with_payload=False)
    vectors, keys, mask = prompts.neighbours()
    np.testing.assert_array_equal(vectors, plain.vectors[:, : cfg.k])
    scored = plain.ids[:, :3].ravel().tolist()  # each prompt's three nearest are being scored
    vectors, keys, mask = prompts.neighbours(exclude=scored)
    assert mask.all() and vectors.shape == (len(classes), cfg.k, mem.dim)
    np.testing.assert_array_equal(vectors, plain.vectors[:, 3 : 3 + cfg.k])
    np.testing.assert_array_equal(keys, plain.searched_vectors[:, 3 : 3 + cfg.k])


@pytest.fixture(scope="module")
def zero_shot(world, setup):
    """RECO's protocol: the fusion trains on unlabelled pairs (ids only) of the training classes and is
    evaluated on the evaluation classes, which it never saw; mean fusion needs no training."""
    mem, _, names, labels, tmp = setup
    ids = [point_id("synthetic", k) for k in world.train_ids]
    out = {}
    # RECO as the classifier scores it by default and alone (gate="none"); mean fusion alone, training-free
    for name, kw, gates in (("RECO", {}, (None, "none")), ("mean", dict(aggregator="mean"), ("none",))):
        model = train_fusion(mem, world.train_image, world.train_text, ids=ids, progress=False,
                             cache_dir=str(tmp / "c"), device="cpu", **kw)
        for gate in gates:
            clf = RecoClassifier(mem, model, gate=gate).set_class_embeddings(world.class_text[world.eval_classes],
                                                                               names)
            out[name if gate is None else f"{name} alone"] = (model, zero_shot_report(clf, world.eval_image, labels))
    return out


def test_zero_shot_without_labels_is_level_with_mean_fusion_on_new_classes(world, zero_shot):
    model, res = zero_shot["RECO"]
    mean = zero_shot["mean alone"][1]["reco"]["top1"]
    assert model.adapted is None and model.cfg.alignment is None  # nothing was adapted to any class
    assert model.pseudo_classes == len(world.train_ids) // 32  # k-means clusters stood in for classes
    assert model.history[0]["epoch"] == 0 and len(model.history) > 1  # it trained, validating on them
    # level with mean fusion (within 1 point, ~10 of 960 images): the zero-shot issue asks for >= mean + 2, not
    # met yet (README "Method"); this guards against the learned fusion falling behind averaging again
    alone = zero_shot["RECO alone"][1]["reco"]["top1"]
    assert min(res["reco"]["top1"], alone) >= mean - 0.01, (res, alone, mean)
    assert res["reco"]["top1"] >= res["baseline"]["top1"] + 0.25, res


def test_pseudo_classes_group_pairs_of_one_class(world):
    """k-means on the pairs (image and text side by side) recovers classes well enough to stand in for them:
    most clusters are dominated by one class, far above what random groups of the same size give."""
    from reco_qdrant.clusters import medoids, pseudo_classes

    lab = pseudo_classes(world.train_image, world.train_text, size=32, seed=0)
    assert lab.min() == 0 and lab.max() + 1 == len(np.unique(lab)) == len(lab) // 32
    purity = np.mean([np.bincount(world.train_labels[lab == c]).max() / (lab == c).sum() for c in np.unique(lab)])
    shuffled = np.random.default_rng(0).permutation(lab)
    chance = np.mean([np.bincount(world.train_labels[shuffled == c]).max() / (shuffled == c).sum()
                      for c in np.unique(lab)])
    assert purity > 2 * chance and purity > 0.3, (purity, chance)
    np.testing.assert_array_equal(lab, pseudo_classes(world.train_image, world.train_text, size=32, seed=0))
    med = medoids(world.train_text, lab)
    assert (lab[med] == np.arange(lab.max() + 1)).all()  # each medoid is a member of its own cluster


def test_pseudo_class_validation_never_meets_a_training_prompt(world):
    """Without labels, validation holds out clusters of the images, and training clusters only the remaining
    pairs: no validation pair shares a training cluster, so no validation caption is a training prompt."""
    from reco_qdrant.clusters import medoids
    from reco_qdrant.pairs import _pseudo_labels
    from reco_qdrant.training import TrainConfig

    labels, v_labels, is_val = _pseudo_labels(world.train_image, world.train_text, TrainConfig(),
                                              np.random.default_rng(0))
    assert 0 < is_val.sum() < len(is_val)
    assert not set(labels[is_val]) & set(labels[~is_val])  # validation rows form classes of their own
    assert not set(v_labels[is_val]) & set(v_labels[~is_val])  # whole image clusters are held out
    assert labels.max() + 1 == len(np.unique(labels))  # contiguous: medoids index by label
    train_prompts = medoids(world.train_text, labels)[np.unique(labels[~is_val])]
    assert not is_val[train_prompts].any()


def test_neighbour_caches_live_in_the_one_cache_directory(monkeypatch, tmp_path):
    """$RECO_CACHE_DIR holds the embeddings' and the neighbours' caches; the old $RECO_CACHE still works, warned."""
    from reco_qdrant.training import TrainConfig, cache_root

    monkeypatch.delenv("RECO_CACHE", raising=False)
    monkeypatch.setenv("RECO_CACHE_DIR", str(tmp_path / "one"))
    assert cache_root(TrainConfig()) == tmp_path / "one" / "neighbours"
    assert cache_root(TrainConfig(out_dir=str(tmp_path / "run"))) == tmp_path / "run" / "cache" / "neighbours"
    monkeypatch.delenv("RECO_CACHE_DIR")
    monkeypatch.setenv("RECO_CACHE", str(tmp_path / "old"))
    with pytest.warns(DeprecationWarning, match=r"\$RECO_CACHE is deprecated"):
        assert cache_root(TrainConfig()) == tmp_path / "old" / "neighbours"
