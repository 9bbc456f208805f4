"""The compose server and the qdrant-client range pip may install are a matched pair, by the client's
own compatibility rule (qdrant_client/common/version_check.py: same major, minor within 1)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version
from qdrant_client.common.version_check import is_compatible

ROOT = Path(__file__).resolve().parents[1]


def compose_server_versions(text: str) -> set[str]:
    return set(re.findall(r"image:\s*qdrant/qdrant:v(\d+\.\d+\.\d+)", text))


def client_spec(pyproject: str) -> Requirement:
    deps = tomllib.loads(pyproject)["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "qdrant-client")


def incompatible(server_versions: set[str], spec: Requirement) -> list[tuple[str, str]]:
    """(client, server) pairs the client would warn about, over every 1.x.y release the range admits."""
    admitted = [f"1.{minor}.{patch}" for minor in range(40) for patch in range(6)
                if Version(f"1.{minor}.{patch}") in spec.specifier]
    assert admitted, f"{spec} admits no qdrant-client 1.x release"
    return [(c, s) for c in admitted for s in server_versions if not is_compatible(c, s)]


def test_compose_server_and_client_range_are_compatible():
    servers = compose_server_versions((ROOT / "docker-compose.yml").read_text())
    assert len(servers) == 1, f"one pinned server version for all services, found {servers}"
    assert incompatible(servers, client_spec((ROOT / "pyproject.toml").read_text())) == []


def test_the_check_fails_on_a_mismatched_pair():
    assert incompatible({"1.16.3"}, Requirement("qdrant-client>=1.12")) != []  # the pair this replaced
    assert ("1.20.0", "1.16.3") in incompatible({"1.16.3"}, Requirement("qdrant-client>=1.18,<1.21"))


def test_the_installed_client_is_compatible_with_the_pinned_server():
    from importlib.metadata import version

    (server,) = compose_server_versions((ROOT / "docker-compose.yml").read_text())
    assert is_compatible(version("qdrant-client"), server)
