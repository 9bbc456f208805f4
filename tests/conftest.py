"""Shared fixtures: small random data, both memory backends, the tiny open_clip encoder, the synthetic world."""

from __future__ import annotations

import numpy as np
import pytest

from reco_qdrant.memory import Memory

BACKENDS = ["edge", "local"]


def pytest_configure(config: pytest.Config) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub


def random_pairs(n: int = 300, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d)).astype(np.float32)
    txt = (img + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, [f"caption number {i}" for i in range(n)]


def open_memory(kind: str, tmp_path, **kw) -> Memory:
    return Memory.open(str(tmp_path / "mem") if kind == "edge" else ":memory:", **kw)


@pytest.fixture(params=BACKENDS)
def memory(request, tmp_path):
    mem = open_memory(request.param, tmp_path)
    yield mem
    mem.close()


@pytest.fixture(scope="session")
def tiny_encoder():
    from reco_qdrant.encoders import load_encoder

    return load_encoder("reco-tiny", None, device="cpu")


@pytest.fixture(scope="session")
def world():
    from reco_qdrant.synthetic import make_world

    return make_world()
