"""Validation scores held-out pairs in rows, so its memory stays bounded however many pairs are held out."""

import numpy as np

from reco_qdrant.validation import _Validation


def test_pair_validation_scores_in_rows_as_in_one_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((50, 8)).astype(np.float32)
    txt = rng.standard_normal((50, 8)).astype(np.float32)
    answer = np.arange(50)
    expected = float(((img @ txt.T).argmax(1) == answer).mean())
    assert 0 < expected < 1  # some right, some wrong: the comparison can fail
    monkeypatch.setattr(_Validation, "ROWS", 7)  # rows that do not divide 50
    v = _Validation(img, (None, None, None), answer, txt, (None, None, None))
    assert v.score(None) == expected
