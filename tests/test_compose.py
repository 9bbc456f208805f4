"""docker-compose.yml against the Compose specification, and README's server flow without Docker.

The file is validated with check-jsonschema's vendored copy of the Compose spec's JSON schema (kept up to
date by that project; no network). The flow runs the `ingest` service's own command line, read from the
compose file, against an embedded memory standing in for the `qdrant` service (same client API).
"""

from __future__ import annotations

import json
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from reco_qdrant.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True)


def test_compose_file_follows_the_compose_spec():
    run = validate(COMPOSE)
    assert run.returncode == 0, run.stdout + run.stderr
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    image = services["qdrant"]["image"]
    assert image.startswith("qdrant/qdrant:v") and image.count(".") == 2  # pinned to a release, not latest
    assert services["qdrant"]["healthcheck"]["test"] and "qdrant-data" in spec["volumes"]
    assert services["ingest"]["depends_on"]["qdrant"]["condition"] == "service_healthy"
    assert services["ingest"]["environment"]["RECO_MEMORY"] == "http://qdrant:6333"
    assert "./data:/data:ro" in services["ingest"]["volumes"]
    nodes = [n for n, s in services.items() if "cluster" in s.get("profiles", [])]
    assert sorted(nodes) == ["node1", "node2", "node3"]
    assert all(services[n]["environment"]["QDRANT__CLUSTER__ENABLED"] == "true" for n in nodes)
    assert all(services[n]["image"] == image for n in nodes)  # one pinned version for the whole cluster


def test_ingest_service_keeps_encoder_weights_in_a_named_volume():
    """The weights the ingest service downloads land in a named volume (HF_HOME inside its mount), so a second run
    reads them instead of downloading again."""
    spec = yaml.safe_load(COMPOSE.read_text())
    ingest = spec["services"]["ingest"]
    hf_home = ingest["environment"]["HF_HOME"]
    named = {v.split(":")[0]: v.split(":")[1] for v in ingest["volumes"] if not v.startswith(("./", "/"))}
    assert named, ingest["volumes"]
    volume = next(n for n, target in named.items() if hf_home == target or hf_home.startswith(target.rstrip("/") + "/"))
    assert volume in spec["volumes"]  # declared: kept across `docker compose run`s, not an anonymous volume
    assert not any(v.endswith(":ro") for v in ingest["volumes"] if v.startswith(volume + ":"))  # written to


def _local_checkpoint_variant() -> str:
    """docker-compose.yml as its comments say to change it for a local checkpoint: the marked volume line
    uncommented, the marked command in place of the one above it."""
    lines, out = COMPOSE.read_text().splitlines(), []
    marked = [ln for ln in lines if ln.rstrip().endswith("# [local checkpoint]")]
    assert len(marked) == 2, "docker-compose.yml: the two lines marked [local checkpoint] are gone"
    for ln in lines:
        if ln.rstrip().endswith("# [local checkpoint]"):
            indent = ln[: len(ln) - len(ln.lstrip())]
            ln = indent + ln.strip()[2:].removesuffix("# [local checkpoint]").rstrip()
            if ln.strip().startswith("command:"):
                out.pop()  # the command it replaces sits just above it
        out.append(ln)
    return "\n".join(out) + "\n"


def test_the_documented_local_checkpoint_mount_is_valid_and_ingests(tmp_path, tiny_encoder, monkeypatch):
    """The commented way to use a local checkpoint: a valid compose file whose ingest command, run with the mounts
    mapped to folders here, encodes with that checkpoint file (the tiny config standing in for ViT-B-32)."""
    from safetensors.torch import save_file
    from test_newcomer import write_images

    variant = tmp_path / "docker-compose.yml"
    variant.write_text(_local_checkpoint_variant())
    run = validate(variant)
    assert run.returncode == 0, run.stdout + run.stderr
    ingest = yaml.safe_load(variant.read_text())["services"]["ingest"]
    assert "./checkpoints:/checkpoints:ro" in ingest["volumes"]
    command = ingest["command"]
    checkpoint = command[command.index("--pretrained") + 1]
    assert checkpoint.startswith("/checkpoints/") and command[:3] == ["reco", "ingest", "auto"]

    data = tmp_path / "data"
    data.mkdir()
    write_images(tmp_path / "stage").rename(data / "memory")  # ./data/memory: the images and their table
    (tmp_path / "stage" / "captions.csv").rename(data / "memory" / "captions.csv")
    (tmp_path / "checkpoints").mkdir()
    save_file({k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()},
              str(tmp_path / "checkpoints" / Path(checkpoint).name))
    mapped = [str(tmp_path / a.lstrip("/")) if a.startswith(("/data", "/checkpoints")) else a for a in command]
    mapped[mapped.index("--model") + 1] = "reco-tiny"
    monkeypatch.setenv("RECO_MEMORY", str(tmp_path / "server-memory"))
    r = CliRunner().invoke(app, mapped[1:] + ["--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["added"] == 24
    from reco_qdrant import Memory

    with Memory.open(str(tmp_path / "server-memory")) as m:
        assert m.encoder_record["id"].startswith("open_clip/reco-tiny/file-sha256:")


BREAKAGES = {
    "misspelt service key": ("    depends_on:\n", "    depend_on:\n"),
    "misspelt key in the shared block": ("  healthcheck:\n", "  healthchek:\n"),
    "ports not a list": ("    ports:\n", '    ports: "6333:6333"\n    x-ports:\n'),  # valid YAML, wrong type
    "profiles not a list": ('    profiles: ["tools"]', '    profiles: tools'),
    "unknown top-level section": ("volumes:\n  qdrant-data:\n", "volume:\n  qdrant-data:\n"),
    "depends_on condition": ("condition: service_healthy", "condition: healthy"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_copy_of_the_compose_file_fails(tmp_path, breakage):
    old, new = BREAKAGES[breakage]
    text = COMPOSE.read_text()
    assert old in text, f"the test's anchor for {breakage!r} is gone from docker-compose.yml"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    run = validate(broken)
    assert run.returncode != 0, f"{breakage}: accepted\n{run.stdout}"


def _readme_lines(prefix: str) -> list[str]:
    return [ln.split("  #")[0].strip() for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith(prefix)]


@pytest.mark.slow
def test_readme_server_flow_ingests_the_exported_demo_idempotently_and_reco_beats_plain_clip(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    [export] = _readme_lines("reco demo --export")
    r = runner.invoke(app, shlex.split(export)[1:])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "eval.npz").is_file()
    r = runner.invoke(app, shlex.split(export)[1:])
    assert r.exit_code != 0 and "already there" in r.output  # never writes over an export

    # the compose `ingest` service, with ./data mounted at /data and the server at RECO_MEMORY
    service = yaml.safe_load(COMPOSE.read_text())["services"]["ingest"]
    command = [str(tmp_path / "data") + a[len("/data"):] if a.startswith("/data") else a for a in service["command"]]
    assert command[:3] == ["reco", "ingest", "auto"]
    monkeypatch.setenv("RECO_MEMORY", str(tmp_path / "server-memory"))
    first = runner.invoke(app, command[1:] + ["--json"])
    assert first.exit_code == 0, first.output
    first = json.loads(first.stdout)
    n_memory = sum(len(np.load(f)) for f in (tmp_path / "data" / "memory" / "img_emb").glob("*.npy"))
    assert first["added"] == first["count"] == n_memory
    second = runner.invoke(app, command[1:] + ["--json"])
    assert second.exit_code == 0, second.output
    second = json.loads(second.stdout)
    assert (second["added"], second["updated"], second["count"]) == (0, 0, n_memory)

    [train] = _readme_lines("reco train ./data/train")
    r = runner.invoke(app, shlex.split(train)[1:] + ["--epochs", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    runpy.run_path(str(ROOT / "examples" / "server_predict.py"), run_name="__main__")
    scores = dict(ln.split(": top-1 ") for ln in capsys.readouterr().out.strip().splitlines()[-2:])
    assert float(scores["RECO"]) > float(scores["plain CLIP"]) + 0.2, scores
