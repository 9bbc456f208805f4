"""Renamed public names still work for one release, each with a DeprecationWarning naming the new one."""

import numpy as np
import pytest
import torch
from conftest import random_pairs

from reco_qdrant import FusionConfig, FusionModel, Memory, RecoMemoryError
from reco_qdrant.neighbors import retrieve


def test_the_old_error_name_is_the_new_class_with_a_warning():
    import reco_qdrant.backends as backends
    import reco_qdrant.memory as memory

    for module in (memory, backends):
        with pytest.warns(DeprecationWarning, match="MemoryError_ is renamed RecoMemoryError"):
            old = module.MemoryError_
        assert old is RecoMemoryError
    with pytest.raises(AttributeError):
        memory.NoSuchName  # noqa: B018 - an unknown name still fails as usual


def test_searched_vectors_under_their_old_names_give_the_same_arrays():
    img, txt, caps = random_pairs(40, 16, seed=2)
    with Memory.open(":memory:") as mem:
        mem.add_embeddings(img, txt, caps)
        new = mem.search(img[:5], "image", k=3, with_searched_vectors=True)
        with pytest.warns(DeprecationWarning, match="with_keys= is renamed with_searched_vectors="):
            old = mem.search(img[:5], "image", k=3, with_keys=True)
        with pytest.warns(DeprecationWarning, match="Neighbours.keys is renamed"):
            np.testing.assert_allclose(old.keys, new.searched_vectors, atol=1e-6)
        with pytest.warns(DeprecationWarning, match="with_keys="):
            via = retrieve(mem, img[:5], "image", 3, with_keys=True)
        np.testing.assert_allclose(via.searched_vectors, new.searched_vectors, atol=1e-6)
        assert new.searched_vectors.shape == (5, 3, 16)


def test_fusion_keys_argument_and_property_are_renamed():
    model = FusionModel(FusionConfig(dim=8, k=3)).eval()
    g = torch.Generator().manual_seed(0)
    q, r, s = (torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
               for shape in ((2, 8), (2, 3, 8), (2, 3, 8)))
    mask, scores = torch.ones(2, 3, dtype=torch.bool), torch.rand(2, 3, generator=g)
    with pytest.warns(DeprecationWarning, match="needs_keys is renamed FusionModel.needs_searched_vectors"):
        assert model.needs_keys == model.needs_searched_vectors
    want = model.refine("image", q, r, mask, scores=scores, searched=s)[0]
    with pytest.warns(DeprecationWarning, match="keys= is renamed searched="):
        got = model.refine("image", q, r, mask, scores=scores, keys=s)[0]
    torch.testing.assert_close(got, want)


def test_a_checkpoint_saved_with_seen_weights_loads_as_adapted(tmp_path):
    """Checkpoints written before the adapted weights were named so (`seen.*` tensors, `learned_classes` and
    `seen_uni_projection` in the config) load unchanged; the old attribute names warn."""
    import json

    from safetensors.torch import load_file, save_file

    base = FusionModel(FusionConfig(dim=8, k=3))
    both = base.with_adapted(FusionModel(FusionConfig(dim=8, k=3, uni_projection=True)), np.eye(2, 8, dtype=np.float32))
    path = both.save_pretrained(tmp_path / "new")
    cfg = json.loads((path / "config.json").read_text())
    cfg["learned_classes"], cfg["seen_uni_projection"] = cfg.pop("adapted_classes"), cfg.pop("adapted_uni_projection")
    (path / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(path / "model.safetensors"))
    save_file({k.replace("adapted.", "seen.", 1): v for k, v in weights.items()}, str(path / "model.safetensors"))
    old = FusionModel.from_pretrained(path)
    assert old.cfg == both.cfg
    for k, v in both.state_dict().items():
        torch.testing.assert_close(old.state_dict()[k], v)
    with pytest.warns(DeprecationWarning, match="FusionModel.seen is renamed FusionModel.adapted"):
        assert old.seen is old.adapted
    with pytest.warns(DeprecationWarning, match="learned is renamed"):
        assert old.learned(np.eye(2, 8, dtype=np.float32)).all()


def test_old_and_new_argument_names_together_are_refused():
    img, txt, caps = random_pairs(20, 8, seed=4)
    with Memory.open(":memory:") as mem:
        mem.add_embeddings(img, txt, caps)
        with pytest.raises(TypeError, match="give with_searched_vectors= only"):
            mem.search(img[:2], "image", k=2, with_searched_vectors=True, with_keys=False)


def test_old_setting_and_config_names_warn_at_the_callers_line(tmp_path):
    from reco_qdrant import TrainConfig, train_fusion

    img, txt, caps = random_pairs(40, 8, seed=5)
    with Memory.open(":memory:") as mem:
        mem.add_embeddings(img, txt, caps)
        with pytest.warns(DeprecationWarning, match="setting seen_model is renamed adapted_model") as caught:
            train_fusion(mem, img, txt, k=3, epochs=0, seen_model=False, progress=False)
        assert any(w.filename == __file__ for w in caught)  # shown by default filters: attributed to this line
    with pytest.warns(DeprecationWarning, match="TrainConfig.seen_model is renamed"):
        assert TrainConfig(adapted_model=False).seen_model is False
    with pytest.warns(DeprecationWarning, match="FusionConfig.learned_classes is renamed"):
        assert FusionConfig(dim=8, adapted_classes=3).learned_classes == 3
    with pytest.warns(DeprecationWarning, match=r"TrainConfig\(seen_model=...\) is renamed adapted_model=") as caught:
        assert TrainConfig(seen_model=False).adapted_model is False
    assert caught[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="is renamed adapted_classes="):
        assert FusionConfig(dim=8, learned_classes=3) == FusionConfig(dim=8, adapted_classes=3)
    with pytest.raises(TypeError, match="give adapted_uni_projection= only"):
        FusionConfig(dim=8, seen_uni_projection=True, adapted_uni_projection=False)


def test_adapt_fusion_keeps_its_run_beside_the_main_one(tmp_path):
    """`adapt_fusion(out_dir=D)` checkpoints under D/seen, as `train_fusion` does for it, so it never restarts over
    (and deletes) a main run kept in D."""
    from reco_qdrant import adapt_fusion

    img, txt, caps = random_pairs(60, 8, seed=6)
    labels = np.arange(60) % 4
    with Memory.open(":memory:") as mem:
        ids = mem.add_embeddings(img, txt, caps)
        model = adapt_fusion(mem, img, txt, labels=labels, class_embeddings=img[:4], ids=ids, k=3, epochs=1,
                             out_dir=str(tmp_path / "run"), on_mismatch="restart", progress=False)
    assert (tmp_path / "run" / "seen" / "best").is_dir() and not (tmp_path / "run" / "best").exists()
    assert model.adapted is None and model.best_epoch in (0, 1)
