"""The installed package, not the source tree: a plain `pip install .` carries the top-level migrations/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_install_carries_migrations_and_reco_migrate_applies_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("reco_qdrant", "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    # not editable, no dependencies (they are in this environment), no index: the wheel built from the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--target", str(target), str(src)], check=True, cwd=tmp_path)
    shipped = sorted(p.name for p in (target / "reco_qdrant" / "migrations").glob("[0-9]*.py"))
    assert shipped == sorted(p.name for p in (ROOT / "migrations").glob("[0-9]*.py")) and shipped

    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", "import sys, reco_qdrant; print(reco_qdrant.__file__, file=sys.stderr); "
                               "from reco_qdrant.cli import main; sys.argv[0] = 'reco'; main()",
         "migrate", "--memory", str(tmp_path / "mem"), "--dim", "8", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert str(target) in run.stderr  # the installed copy ran, not the source tree
    assert json.loads(run.stdout)["applied"] == [p[:-3] for p in shipped]
