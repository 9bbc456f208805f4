"""Server path: retries on transient faults, a clear error when the server stays down, and the
docker-compose Qdrant (pytest-docker), skipped with a reason where no Docker engine runs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import random_pairs
from qdrant_client import QdrantClient

from reco_qdrant.backends import ServerBackend
from reco_qdrant.config import MemoryConfig
from reco_qdrant.memory import Memory, MemoryUnavailableError

ROOT = Path(__file__).resolve().parents[1]


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE


class FlakyClient:
    """A real local-mode client whose first `failures` calls fail as an unreachable gRPC server would."""

    def __init__(self, failures: int) -> None:
        self.inner, self.failures, self.calls = QdrantClient(":memory:"), failures, 0

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*a, **kw):
            self.calls += 1
            if self.failures > 0:
                self.failures -= 1
                raise _Unavailable()
            return fn(*a, **kw)

        return call


def test_transient_errors_are_retried():
    cfg = MemoryConfig(location="http://stand-in:6333", retries=5, retry_max_wait=0.05)
    client = FlakyClient(failures=3)
    mem = Memory(ServerBackend(cfg, client=client), cfg)
    img, txt, caps = random_pairs(20)
    mem.add_embeddings(img, txt, caps)
    client.failures = 2
    assert mem.search(img[:2], "image", k=1).captions == [[caps[0]], [caps[1]]]


def test_server_that_stays_down_fails_clearly_and_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(MemoryUnavailableError, match=f"127.0.0.1:{port}.*did not answer after 3 attempts"):
        Memory.open(f"http://127.0.0.1:{port}", grpc_port=port, retries=3, retry_max_wait=0.2, timeout=2)
    assert time.perf_counter() - t0 < 30


def _docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _compose_client() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(["docker", "compose", "version"],
                                                           capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_client(), reason="no `docker compose` client on this machine")
def test_compose_file_validates():
    r = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def docker_compose_file():
    return str(ROOT / "docker-compose.yml")


@pytest.mark.docker
@pytest.mark.skipif(not _docker_engine(), reason="no Docker engine runs here: the compose Qdrant cannot start")
def test_conformance_against_compose_qdrant(docker_services):
    def ready() -> bool:
        try:
            QdrantClient(url="http://127.0.0.1:6333", timeout=2).get_collections()
            return True
        except Exception:
            return False

    docker_services.wait_until_responsive(timeout=120, pause=1, check=ready)
    img, txt, caps = random_pairs(300)
    with Memory.open("http://127.0.0.1:6333", collection="reco_test") as mem:
        ids = mem.add_embeddings(img, txt, caps, ids=range(300), source="t")
        nb = mem.search(img[:5], "image", k=3, return_modality="text")
        assert list(nb.ids[:, 0]) == ids[:5]
        np.testing.assert_allclose(nb.vectors[:, 0], txt[:5], atol=1e-5)
        assert mem.count() == 300
