"""A newcomer's first hour, replayed through the `reco` command in fresh processes, on generated images.

Ingest an image folder with a captions csv (random weights: `--pretrained none`, with the small `reco-tiny`
config so that it runs in seconds), search it, train from the same folder, predict, `reco info`, `reco doctor`.
Each step's exit code and the lines a newcomer reads are checked, and that every line fits an 80-column
terminal (progress bars included) and no third-party warning reaches it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

RECO = Path(sys.executable).parent / "reco"  # the console script `pip install` made
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def write_images(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """`per_class` noisy 48x48 PNGs of each colour in root/images, and root/captions.csv (file, caption, label)."""
    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir(parents=True)
    rows = ["file,caption,label"]
    for name, c in COLORS.items():
        for i in range(per_class):
            arr = np.clip(np.array(c) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{name}_{i}.png")
            rows.append(f"{name}_{i}.png,a {name} square number {i},{name}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


def visible_lines(text: str) -> list[str]:
    """What a terminal shows, line by line: colour codes dropped, progress redraws (\\r) split apart."""
    return [ln for ln in re.split(r"[\r\n]", ANSI.sub("", text)) if ln.strip()]


class Newcomer:
    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        # a terminal 80 columns wide (FORCE_COLOR makes rich draw its live progress bars as on a terminal)
        self.env = {**os.environ, "COLUMNS": "80", "FORCE_COLOR": "1", "RECO_CACHE_DIR": str(cwd / "cache"),
                    "HF_HUB_OFFLINE": "1"}

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        assert RECO.exists(), "install the package (pip install -e .) so that `reco` exists"
        r = subprocess.run([str(RECO), *args], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                           timeout=600)
        said = f"reco {' '.join(args)}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        assert (r.returncode == 0) == ok, said
        # progress bars and tables fit (an error line is left whole, for copying: the terminal wraps it)
        for line in [] if not ok else visible_lines(r.stderr) + ([] if "--json" in args else visible_lines(r.stdout)):
            assert len(line) <= 80, f"{len(line)} columns: {line!r}\n{said}"
        assert "Warning" not in r.stderr and "WARNING" not in r.stderr, said  # no third-party warnings
        r.flat_err = " ".join(ANSI.sub("", r.stderr).split())  # type: ignore[attr-defined]
        r.flat_out = " ".join(ANSI.sub("", r.stdout).split())  # type: ignore[attr-defined]
        return r


def test_newcomer_first_hour_on_generated_images(tmp_path):
    me = Newcomer(tmp_path)
    images = write_images(tmp_path)
    mem = "memory"

    # ingest the image folder with its captions csv (random weights: a dry run of the flow)
    r = me.run("ingest", "images", "images", "--captions", "captions.csv", "--memory", mem, "--model", "reco-tiny",
               "--pretrained", "none")
    assert "24 added, 0 updated" in r.flat_out and "memory holds 24 points" in r.flat_out
    assert "ingest" in r.stderr and "24/24" in r.stderr  # the progress bar, drawn within 80 columns

    # search: later commands use the encoder the memory records, no --model needed
    r = me.run("search", "--text", "a blue square number 3", "--memory", mem, "--k", "3", "--json")
    hits = json.loads(r.stdout)
    assert len(hits) == 3 and hits[0]["caption"] == "a blue square number 3" and hits[0]["score"] > 0.99
    assert hits[0]["uri"] == str((images / "blue_3.png").resolve())
    assert "encoder: open_clip/reco-tiny/random-seed0 (recorded with the memory)" in r.flat_err

    # train from the same folder and table: encoded with the memory's encoder, cached; the pairs are the memory's
    # own, found by their keys and left out of their own neighbours
    train = ("train", "images", "--captions", "captions.csv", "--memory", mem, "--out", "run", "--epochs", "2",
             "--k", "5")
    r = me.run(*train)
    assert "24 training pairs from images: encoded with open_clip/reco-tiny/random-seed0, cached in" in r.flat_err
    assert (f"24 of the 24 training pairs are in the memory (source {images.resolve()}, found by their keys): "
            "each is left out of its own neighbours") in r.flat_err
    assert "saved run/best" in r.flat_out and (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npz"))) == 1
    r = me.run(*train)  # a second run reads the embeddings back instead of encoding again
    assert "24 training pairs from images: embeddings read from the cache" in r.flat_err
    assert "24 of the 24 training pairs are in the memory" in r.flat_err

    # predict with the trained fusion
    r = me.run("predict", "images/red_0.png", "images/blue_1.png", "--classes", ",".join(COLORS), "--fusion",
               "run/best", "--memory", mem, "--json")
    pred = json.loads(r.stdout)
    assert [p["image"] for p in pred] == ["images/red_0.png", "images/blue_1.png"]
    assert all(p["class"] in COLORS and 0 <= p["probability"] <= 1 for p in pred)
    r = me.run("predict", "images/red_0.png", "images/blue_1.png", "--classes", ",".join(COLORS), "--fusion",
               "run/best", "--memory", mem, "--gate", "coverage", "--json")  # encoder's evidence where doubtful
    gated = json.loads(r.stdout)
    assert [p["image"] for p in gated] == [p["image"] for p in pred]
    assert all(p["class"] in COLORS and 0 <= p["probability"] <= 1 for p in gated)
    # evaluate on a class-per-folder copy of a few images, RECO through the gate beside the baseline
    for name in COLORS:
        (tmp_path / "byclass" / name).mkdir(parents=True)
        for i in range(2):
            shutil.copy(images / f"{name}_{i}.png", tmp_path / "byclass" / name)
    r = me.run("eval", "zero-shot", "byclass", "--fusion", "run/best", "--memory", mem, "--gate", "coverage",
               "--output", "eval.json")
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["gate"] == "coverage" and res["n_images"] == 2 * len(COLORS) and res["n_classes"] == len(COLORS)
    assert 0 <= res["reco"]["top1"] <= 1 and "RECO, coverage gate" in r.flat_out

    # info lists the sources with their counts
    r = me.run("info", "--memory", mem, "--json")
    info = json.loads(r.stdout)
    assert info["count"] == 24 and info["sources"] == {str(images.resolve()): 24}
    r = me.run("info", "--memory", mem)
    assert "│ source" in r.flat_out and "24 points" in r.flat_out

    # doctor: whole, but a dry run's encoder: it says so (a warning, exit code 0)
    r = me.run("doctor", "--memory", mem)
    assert "ok: opens: memory / reco_memory, 24 points" in r.flat_out and "ok: 24 points read" in r.flat_out
    assert ("warning: the encoder open_clip/reco-tiny/random-seed0 has random weights (ingested with --pretrained "
            "none)") in r.flat_out
    assert "problem" not in r.flat_out

    # the newcomer's mistakes: a memory that does not exist, a wrong column; each names its fix
    r = me.run("info", "--memory", "nope", ok=False)
    assert "no such directory, so no memory there" in r.flat_err and "reco ingest images" in r.flat_err
    assert not (tmp_path / "nope").exists()
    r = me.run("ingest", "images", "images", "--captions", "captions.csv", "--caption-column", "text", "--memory",
               mem, "--pretrained", "none", ok=False)
    assert "no column 'text'" in r.flat_err and "--caption-column" in r.flat_err and "--debug" not in r.flat_err
