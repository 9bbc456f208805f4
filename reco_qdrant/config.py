"""Settings for the memory, read once from arguments and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

DEFAULT_LOCATION = "./reco-data"
DEFAULT_COLLECTION = "reco_memory"


def default_location() -> str:
    """`RECO_MEMORY` if set, else `./reco-data` (an embedded Qdrant Edge directory)."""
    return os.environ.get("RECO_MEMORY") or DEFAULT_LOCATION


@dataclass(frozen=True)
class MemoryConfig:
    """Where the memory lives and how its Qdrant collection is built and queried."""

    location: str = field(default_factory=default_location)  # directory | ":memory:" | http(s)://host[:port]
    collection: str = DEFAULT_COLLECTION  # one collection (or Edge shard) per memory
    # server connection
    api_key: str | None = field(default=None, repr=False)  # never printed; RECO_API_KEY / QDRANT_API_KEY
    # TLS (https:// URLs): PEM files; from RECO_TLS_CA_CERT / RECO_TLS_CLIENT_CERT / RECO_TLS_CLIENT_KEY
    tls_ca_cert: str | None = None  # CA bundle that signed the server's certificate (self-signed setups)
    tls_client_cert: str | None = None  # client certificate chain, for servers that require mutual TLS
    tls_client_key: str | None = field(default=None, repr=False)  # its private key
    prefer_grpc: bool = True  # gRPC on grpc_port; REST on the URL's port as fallback
    grpc_port: int = 6334
    timeout: float = 60.0  # seconds per request; qdrant-client's gRPC default (5 s) is too short for bulk
    retries: int = 5  # attempts for idempotent calls on transient server errors
    retry_max_wait: float = 8.0  # cap of the exponential backoff, seconds
    # collection layout, applied by migrations
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    full_scan_threshold: int = 10_000  # KB of vectors below which a segment is searched exactly
    # "int8" (scalar quantization in RAM, searched with rescoring on the float vectors) | "binary" (2 bits a
    # dimension in RAM, rescored likewise: 4x less RAM than int8, for the largest memories) | None (float only)
    quantization: str | None = "int8"
    on_disk: bool = False  # keep original vectors on disk (mmap) instead of RAM
    on_disk_payload: bool = False  # payloads (captions) in RAM: faster hits; True for huge payloads
    # embedded Edge: a float32 copy of the vectors beside the collection, from which searches gather their
    # hits' vectors with numpy (about 2x faster searches that return vectors; 2 x 4 x d more bytes on disk per pair)
    vector_copy: bool = True
    shard_number: int = 1  # server only: shards of the collection
    replication_factor: int = 1  # server only: copies of each shard
    # search
    hnsw_ef: int = 128  # beam width at search time; higher = better recall, slower
    upsert_batch: int = 512  # points per upsert request
    # server only: upsert requests in flight at once while adding a batch (a batch is stored when all are)
    upload_workers: int = 4

    def with_env(self) -> MemoryConfig:
        """Fill secrets and TLS files from the environment when not given explicitly."""
        env = os.environ.get
        key = self.api_key or env("RECO_API_KEY") or env("QDRANT_API_KEY")
        return replace(self, api_key=key or None,
                       tls_ca_cert=self.tls_ca_cert or env("RECO_TLS_CA_CERT") or None,
                       tls_client_cert=self.tls_client_cert or env("RECO_TLS_CLIENT_CERT") or None,
                       tls_client_key=self.tls_client_key or env("RECO_TLS_CLIENT_KEY") or None)

    def client_kwargs(self) -> dict:
        """Keyword arguments for `qdrant_client.QdrantClient` (server URLs): auth, TLS, timeouts.

        TLS files are read here so that a missing or unreadable one is named before any connection.
        """
        tls = {"tls_ca_cert": self.tls_ca_cert, "tls_client_cert": self.tls_client_cert,
               "tls_client_key": self.tls_client_key}
        given = {k: v for k, v in tls.items() if v}
        if given and not self.location.startswith("https://"):
            raise ValueError(f"{', '.join(given)} set, but {self.location} is not an https:// URL")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ValueError("mutual TLS needs both tls_client_cert and tls_client_key")
        pem = {}
        for name, path in given.items():
            try:
                pem[name] = open(path, "rb").read()
            except OSError as e:
                raise FileNotFoundError(f"{name}: cannot read {path}: {e.strerror}") from None
            if b"-----BEGIN" not in pem[name]:
                raise ValueError(f"{name}: {path} is not a PEM file")
        kw: dict = {"url": self.location, "api_key": self.api_key, "prefer_grpc": self.prefer_grpc,
                    "grpc_port": self.grpc_port, "timeout": int(self.timeout)}
        if self.location.startswith("https://"):
            kw["https"] = True
        grpc_tls = {"root_certificates": pem.get("tls_ca_cert"), "certificate_chain": pem.get("tls_client_cert"),
                    "private_key": pem.get("tls_client_key")}
        if any(grpc_tls.values()):
            kw["grpc_options"] = {k: v for k, v in grpc_tls.items() if v}
        if given:  # REST (httpx) takes an SSL context
            import ssl

            ctx = ssl.create_default_context(cafile=self.tls_ca_cert)
            if self.tls_client_cert:
                ctx.load_cert_chain(self.tls_client_cert, self.tls_client_key)
            kw["verify"] = ctx
        return kw

    @property
    def kind(self) -> str:
        """'server' for URLs, 'local' for qdrant-client's in-process ':memory:', else 'edge'."""
        if self.location.startswith(("http://", "https://")):
            return "server"
        if self.location == ":memory:":
            return "local"
        return "edge"
