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


_READER = """
import sys, numpy as np
from reco_qdrant import Memory
img = np.load(sys.argv[1])
with Memory.open(sys.argv[2], collection=sys.argv[3]) as mem:
    for i in range(40):
        nb = mem.search(img[i % 100][None], "image", k=3)
        assert nb.scores[0, 0] > 0.999, nb.scores
print("ok")
"""


@pytest.mark.docker
@pytest.mark.skipif(not _docker_engine(), reason="no Docker engine runs here: the compose Qdrant cannot start")
def test_workflow_against_compose_qdrant(docker_services, tmp_path):
    """Over gRPC on the compose server: ingest (CLI), train, predict; two reader processes run while one writes."""
    import sys

    from test_method import fill
    from typer.testing import CliRunner

    from reco_qdrant import RecoClassifier, train_fusion
    from reco_qdrant.cli import app
    from reco_qdrant.evaluation import zero_shot_report
    from reco_qdrant.memory import point_id
    from reco_qdrant.sources import write_embedding_shards
    from reco_qdrant.synthetic import make_world

    url, coll = "http://127.0.0.1:6333", f"reco_wf_{int(time.time())}"
    docker_services.wait_until_responsive(timeout=120, pause=1,
                                          check=lambda: QdrantClient(url=url, timeout=2).get_collections() and True)
    img, txt, caps = random_pairs(3000, d=16, seed=7)
    write_embedding_shards(tmp_path / "laion", img[:100], txt[:100], caps[:100])
    r = CliRunner().invoke(app, ["ingest", "embeddings", str(tmp_path / "laion"), "--memory", url,
                                 "--collection", coll, "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    np.save(tmp_path / "img.npy", img)
    readers = [subprocess.Popen([sys.executable, "-c", _READER, str(tmp_path / "img.npy"), url, coll],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    with Memory.open(url, collection=coll) as mem:
        for s in range(100, 3000, 200):
            mem.add_embeddings(img[s:s + 200], txt[s:s + 200], caps[s:s + 200], ids=range(s, s + 200), source="w")
        assert [p.communicate(timeout=300)[0].strip() for p in readers] == ["ok", "ok"]
        assert mem.count() == 3000
    w = make_world()
    with fill(Memory.open(url, collection=coll + "_world"), w) as mem:
        model = train_fusion(mem, w.train_image, w.train_text, labels=w.train_labels, class_embeddings=w.class_text,
                             ids=[point_id("synthetic", k) for k in w.train_ids], progress=False, device="cpu",
                             epochs=5, cache_dir=str(tmp_path / "c"))
        names = [w.class_names[c] for c in w.eval_classes]
        clf = RecoClassifier(mem, model).set_class_embeddings(w.class_text[w.eval_classes], names)
        res = zero_shot_report(clf, w.eval_image, np.searchsorted(w.eval_classes, w.eval_labels))
        assert res["reco"]["top1"] > res["baseline"]["top1"] + 0.2, res
    client = QdrantClient(url=url)
    for c in (coll, coll + "_world"):
        for name in (c, c + "__meta"):
            client.delete_collection(name)


def _make_certs(d: Path) -> dict[str, Path]:
    """A throw-away CA and a localhost server certificate signed by it (openssl CLI)."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=reco test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@pytest.fixture
def https_qdrant_stand_in(tmp_path):
    """An HTTPS server answering Qdrant's REST `collection exists` call, recording the headers it gets."""
    import http.server
    import json
    import ssl
    import threading

    certs = _make_certs(tmp_path)
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(dict(self.headers))
            body = json.dumps({"result": {"exists": True}, "status": "ok", "time": 0}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", certs, seen
    server.shutdown()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make test certificates")
def test_tls_with_private_ca_and_api_key(https_qdrant_stand_in, monkeypatch):
    """REST over TLS: the CA from RECO_TLS_CA_CERT verifies the server, the API key travels, nothing leaks."""
    url, certs, seen = https_qdrant_stand_in
    monkeypatch.setenv("RECO_API_KEY", "s3cret-key")
    monkeypatch.setenv("RECO_TLS_CA_CERT", str(certs["ca"]))
    cfg = MemoryConfig(location=url, prefer_grpc=False, retries=1).with_env()
    backend = ServerBackend(cfg)
    assert backend.has_collection() is True
    assert seen and seen[-1].get("api-key") == "s3cret-key"
    assert "s3cret-key" not in repr(cfg)
    assert str(certs["key"]) not in repr(MemoryConfig(tls_client_key=str(certs["key"])))
    backend.client.close()
    monkeypatch.delenv("RECO_TLS_CA_CERT")  # without our CA the certificate is not trusted: refused, not ignored
    with pytest.raises(MemoryUnavailableError, match="did not answer"):
        ServerBackend(MemoryConfig(location=url, prefer_grpc=False, retries=1).with_env())


def test_tls_options_are_checked_before_connecting(tmp_path):
    with pytest.raises(ValueError, match="not an https:// URL"):
        MemoryConfig(location="http://localhost:6333", tls_ca_cert="ca.pem").client_kwargs()
    with pytest.raises(FileNotFoundError, match="tls_ca_cert: cannot read .*missing.pem"):
        MemoryConfig(location="https://localhost:6333", tls_ca_cert=str(tmp_path / "missing.pem")).client_kwargs()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="junk.pem is not a PEM file"):
        MemoryConfig(location="https://localhost:6333", tls_ca_cert=str(tmp_path / "junk.pem")).client_kwargs()
    with pytest.raises(ValueError, match="needs both"):
        MemoryConfig(location="https://localhost:6333", tls_client_cert="c.pem").client_kwargs()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make test certificates")
def test_grpc_tls_options_carry_the_pem_bytes(tmp_path):
    certs = _make_certs(tmp_path)
    kw = MemoryConfig(location="https://qdrant.example:6333", tls_ca_cert=str(certs["ca"]),
                      tls_client_cert=str(certs["cert"]), tls_client_key=str(certs["key"])).client_kwargs()
    assert kw["https"] is True and kw["grpc_options"]["root_certificates"] == certs["ca"].read_bytes()
    assert kw["grpc_options"]["private_key"] == certs["key"].read_bytes()
    QdrantClient(**kw).close()  # qdrant-client accepts them (a gRPC channel connects lazily)


@pytest.mark.parametrize("location", [":memory:", "edge"])
def test_readers_and_a_writer_in_threads(location, tmp_path):
    """Threads sharing one memory: searches run while batches are upserted; nothing fails or is lost.

    (Across processes the server path is exercised by the compose test below.)"""
    import threading

    img, txt, caps = random_pairs(3000, d=16, seed=3)
    errors: list[BaseException] = []
    with Memory.open(str(tmp_path / "m") if location == "edge" else location) as mem:
        mem.add_embeddings(img[:500], txt[:500], caps[:500], ids=range(500))
        done = threading.Event()

        def writer():
            try:
                for s in range(500, 3000, 250):
                    mem.add_embeddings(img[s:s + 250], txt[s:s + 250], caps[s:s + 250], ids=range(s, s + 250))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            finally:
                done.set()

        def reader(seed: int):
            rng = np.random.default_rng(seed)
            try:
                while not done.is_set():
                    rows = rng.integers(0, 500, 8)
                    nb = mem.search(img[rows], "image", k=5)
                    assert (nb.ids[:, 0] != "").all() and (nb.scores[:, 0] > 0.999).all()
                    assert [c[0] for c in nb.captions] == [caps[r] for r in rows]
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert mem.count() == 3000
