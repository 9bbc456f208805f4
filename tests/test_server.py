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


class SnapshotServerStandIn:
    """Stands in for a Qdrant server with snapshots (qdrant-client's local mode has none): a local-mode client
    whose create_snapshot keeps a copy of the collection under a name, and whose recover_snapshot recreates it
    from the location's last path component, as the server fetching its own download URL would."""

    def __init__(self) -> None:
        self.inner, self.snapshots, self.recovered = QdrantClient(":memory:"), {}, []

    def __call__(self, **client_kwargs):  # stands in for the QdrantClient class: every client is this server
        return self

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def close(self) -> None:
        pass

    def create_snapshot(self, collection_name, wait=True, **kw):
        from qdrant_client import models

        points, offset = [], None
        while True:
            recs, offset = self.inner.scroll(collection_name, limit=256, offset=offset, with_vectors=True,
                                             with_payload=True)
            points += [models.PointStruct(id=r.id, vector=r.vector, payload=r.payload) for r in recs]
            if offset is None:
                break
        name = f"{collection_name}-{len(self.snapshots)}.snapshot"
        self.snapshots[name] = (self.inner.get_collection(collection_name).config.params.vectors, points)
        return models.SnapshotDescription(name=name, size=1, creation_time=None)

    def recover_snapshot(self, collection_name, location, api_key=None, wait=True, **kw):
        vectors, points = self.snapshots[location.rsplit("/", 1)[-1]]
        self.recovered.append((collection_name, location, api_key))
        self.inner.create_collection(collection_name, vectors_config=vectors)
        if points:
            self.inner.upsert(collection_name, points)
        return True


def test_backup_and_restore_of_a_server_memory_through_snapshots(tmp_path, monkeypatch):
    """`reco backup` on a server takes snapshots of the collection and its ledger (named, with their download
    URLs, in DEST's manifest); `reco restore` has the server recover them and verifies the count."""
    import json

    import qdrant_client
    from typer.testing import CliRunner

    from reco_qdrant.cli import app
    from reco_qdrant.memory import SNAPSHOT_MANIFEST, point_id

    server, url = SnapshotServerStandIn(), "http://stand-in:6333"
    monkeypatch.setattr(qdrant_client, "QdrantClient", server)
    monkeypatch.setenv("RECO_API_KEY", "k3y")
    img, txt, caps = random_pairs(120, seed=4)
    with Memory.open(url, collection="live") as mem:
        mem.add_embeddings(img, txt, caps, ids=range(120), source="s", encoder_id="enc")
    runner = CliRunner()
    r = runner.invoke(app, ["backup", str(tmp_path / "bk"), "--memory", url, "--collection", "live"])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "120 points, as Qdrant snapshots kept on the server" in flat
    assert f"snapshot live-0.snapshot of live (download: curl -H \"api-key: $RECO_API_KEY\" -o live-0.snapshot " \
           f"{url}/collections/live/snapshots/live-0.snapshot)" in flat, flat
    assert "snapshot live__meta-1.snapshot of live__meta" in flat and f"reco restore {tmp_path / 'bk'}" in flat
    manifest = json.loads((tmp_path / "bk" / SNAPSHOT_MANIFEST).read_text())
    assert manifest["points"] == 120 and manifest["collection"] == "live" and manifest["location"] == url

    r = runner.invoke(app, ["restore", str(tmp_path / "bk"), "--memory", url, "--collection", "back"])
    assert r.exit_code == 0, r.output
    assert "verified: 120 points" in " ".join(r.output.split())
    assert [(c, k) for c, _, k in server.recovered] == [("back", "k3y"), ("back__meta", "k3y")]
    with Memory.open(url, collection="back", encoder="enc") as back:  # the encoder record came back with it
        assert back.count() == 120
        assert back.search(img[:2], "image", k=1).ids[:, 0].tolist() == [point_id("s", "0"), point_id("s", "1")]

    r = runner.invoke(app, ["restore", str(tmp_path / "bk"), "--memory", url, "--collection", "back"])
    assert r.exit_code == 1 and f"error: {url} already holds collection 'back'" in " ".join(r.output.split())
    assert len(server.recovered) == 2  # nothing recovered over it

    one = f"{url}/collections/live/snapshots/live-0.snapshot"  # a snapshot location, without its ledger
    r = runner.invoke(app, ["restore", one, "--memory", url, "--collection", "bare", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["points"] == 120, r.output
    assert json.loads(r.stdout)["verified"] is False  # nothing recorded the count: nothing was compared
    r = runner.invoke(app, ["restore", one, "--memory", url, "--collection", "bare2"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 0 and "120 points, not verified (the backup records no exact count)" in flat, flat
    assert "verified: 120" not in flat


def test_restore_sends_the_api_key_only_to_the_servers_own_snapshot_urls(tmp_path, monkeypatch):
    """recover_snapshot makes the server fetch the URL with the key given: a snapshot on another host must not
    receive the server's API key."""
    import qdrant_client

    from reco_qdrant.memory import Restored

    server, url = SnapshotServerStandIn(), "http://stand-in:6333"
    monkeypatch.setattr(qdrant_client, "QdrantClient", server)
    monkeypatch.setenv("RECO_API_KEY", "k3y")
    img, txt, caps = random_pairs(30, seed=5)
    with Memory.open(url, collection="live") as mem:
        mem.add_embeddings(img, txt, caps, ids=range(30))
        snap = mem.snapshot()
    name = snap["snapshots"]["live"]
    for where, key in ((f"https://elsewhere.example/{name}", None), (f"http://stand-in:6334/{name}", None),
                       (f"http://STAND-IN:6333/collections/live/snapshots/{name}", "k3y"),
                       (f"file:///qdrant/snapshots/live/{name}", None)):
        coll = f"c{len(server.recovered)}"
        done = Memory.restore(where, url, coll)
        assert isinstance(done, Restored) and done.points == 30 and not done.verified and "manifest" in done.why
        assert server.recovered[-1] == (coll, where, key), where


def test_a_server_snapshot_recovered_short_is_refused(tmp_path, monkeypatch):
    import qdrant_client

    from reco_qdrant.memory import MemoryDamagedError

    server, url = SnapshotServerStandIn(), "http://stand-in:6333"
    monkeypatch.setattr(qdrant_client, "QdrantClient", server)
    img, txt, caps = random_pairs(50, seed=2)
    with Memory.open(url) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(50))
        assert mem.backup(tmp_path / "bk") == 50
    name = next(n for n in server.snapshots if n.startswith("reco_memory-"))
    server.snapshots[name] = (server.snapshots[name][0], server.snapshots[name][1][:40])  # a short snapshot file
    with pytest.raises(MemoryDamagedError, match="recovered 40 points, but the backup .* holds 50") as e:
        Memory.restore(tmp_path / "bk", url, "copy")
    msg = str(e.value)
    assert "deleted the collections this restore had recovered (copy, copy__meta)" in msg, msg
    assert "recover it again" not in msg, msg
    assert not server.inner.collection_exists("copy") and not server.inner.collection_exists("copy__meta")
    assert server.inner.count("reco_memory").count == 50  # the memory backed up is untouched


def test_a_server_restore_whose_ledger_fails_leaves_nothing(tmp_path, monkeypatch):
    """All or nothing: the ledger's snapshot failing after the collection was recovered deletes the collection
    this restore recovered (it did not exist before), says so, and the same restore then runs again."""
    import qdrant_client

    from reco_qdrant.memory import RecoMemoryError, Restored

    server, url = SnapshotServerStandIn(), "http://stand-in:6333"
    monkeypatch.setattr(qdrant_client, "QdrantClient", server)
    img, txt, caps = random_pairs(20, seed=2)
    with Memory.open(url) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(20))
        mem.backup(tmp_path / "bk")
    real = server.recover_snapshot

    def failing(collection_name, location, **kw):
        if collection_name.endswith("__meta"):
            raise RuntimeError("snapshot download failed: 404")
        return real(collection_name, location, **kw)

    server.recover_snapshot = failing
    with pytest.raises(RecoMemoryError) as e:
        Memory.restore(tmp_path / "bk", url, "copy")
    msg = str(e.value)
    assert "snapshot download failed: 404" in msg and "deleted the collections this restore had recovered (copy)" \
        in msg, msg
    assert not server.inner.collection_exists("copy")
    del server.recover_snapshot
    assert Memory.restore(tmp_path / "bk", url, "copy") == Restored(20, True)


def test_a_failed_restore_names_the_hosts_when_the_api_key_was_withheld(tmp_path, monkeypatch):
    import qdrant_client

    from reco_qdrant.memory import RecoMemoryError

    server, url = SnapshotServerStandIn(), "http://stand-in:6333"
    monkeypatch.setattr(qdrant_client, "QdrantClient", server)
    monkeypatch.setenv("RECO_API_KEY", "k3y")

    def unauthorized(collection_name, location, api_key=None, **kw):
        raise RuntimeError("403 Forbidden")

    server.recover_snapshot = unauthorized
    with pytest.raises(RecoMemoryError) as e:
        Memory.restore("http://10.0.0.5:6333/collections/live/snapshots/x.snapshot", url, "c")
    msg = " ".join(str(e.value).split())
    assert "403 Forbidden" in msg and "the API key was not sent to 10.0.0.5:6333" in msg, msg
    assert "stand-in:6333" in msg and "file:// path on the server" in msg, msg


@pytest.mark.docker
@pytest.mark.skipif(not _docker_engine(), reason="no Docker engine runs here: the compose Qdrant cannot start")
def test_backup_and_restore_against_compose_qdrant(docker_services, tmp_path):
    """The real snapshot API: the server snapshots the collection and its ledger, then recovers them from its
    own download URLs into new collections, and the count is verified."""
    from reco_qdrant.memory import point_id

    url, coll = "http://127.0.0.1:6333", f"reco_bk_{int(time.time())}"
    docker_services.wait_until_responsive(timeout=120, pause=1,
                                          check=lambda: QdrantClient(url=url, timeout=2).get_collections() and True)
    img, txt, caps = random_pairs(500, seed=8)
    with Memory.open(url, collection=coll) as mem:
        mem.add_embeddings(img, txt, caps, ids=range(500), source="s")
        assert mem.backup(tmp_path / "bk") == 500
    try:
        assert Memory.restore(tmp_path / "bk", url, coll + "_back").points == 500
        with Memory.open(url, collection=coll + "_back") as back:
            assert back.count() == 500
            assert back.search(img[:3], "image", k=1).ids[:, 0].tolist() == [point_id("s", str(i)) for i in range(3)]
    finally:
        client = QdrantClient(url=url)
        for c in (coll, coll + "__meta", coll + "_back", coll + "_back__meta"):
            if client.collection_exists(c):
                client.delete_collection(c)


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
