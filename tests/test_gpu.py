"""CUDA paths: training with bf16 autocast, inference, against CPU. Skipped, saying why, without CUDA;
`benchmarks/gpu_check.py` is the fuller check to run on a GPU machine (its dry run is tested here too)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reco_qdrant import Memory, RecoClassifier, train_fusion
from reco_qdrant.memory import point_id

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs CUDA: torch.cuda.is_available() is False on this machine "
                                 "(run benchmarks/gpu_check.py where there is a GPU)")


@pytest.fixture
def world_memory(world, tmp_path):
    with Memory.open(str(tmp_path / "m")) as mem:
        mem.add_embeddings(world.memory_image, world.memory_text, world.memory_captions, ids=world.memory_ids,
                           source="synthetic", encoder_id="synthetic-world")
        yield mem


def _train(mem, world, device: str, precision: str, tmp_path):
    return train_fusion(mem, world.train_image, world.train_text, labels=world.train_labels,
                        class_embeddings=world.class_text, ids=[point_id("synthetic", k) for k in world.train_ids],
                        device=device, precision=precision, epochs=3, seed=0, progress=False,
                        cache_dir=str(tmp_path / "cache"))


def _proba(mem, world, model, device: str) -> np.ndarray:
    names = [world.class_names[c] for c in world.eval_classes]
    clf = RecoClassifier(mem, copy.deepcopy(model), device=device)
    return clf.set_class_embeddings(world.class_text[world.eval_classes], names).predict_proba_embeddings(
        world.eval_image)


@pytest.mark.gpu
@cuda
def test_cuda_training_bf16_and_inference_match_cpu(world, world_memory, tmp_path):
    on_gpu = _train(world_memory, world, "cuda", "auto", tmp_path)
    on_cpu = _train(world_memory, world, "cpu", "fp32", tmp_path)
    assert on_gpu.device.type == "cuda"
    truth = np.searchsorted(world.eval_classes, world.eval_labels)
    acc = {d: float(np.mean(_proba(world_memory, world, m, d).argmax(1) == truth))
           for d, m in (("cuda", on_gpu), ("cpu", on_cpu))}
    assert abs(acc["cuda"] - acc["cpu"]) <= 0.03, acc
    same = _proba(world_memory, world, on_cpu, "cuda") - _proba(world_memory, world, on_cpu, "cpu")
    assert np.abs(same).max() <= 1e-3  # the same weights, inference on two devices


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    run = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--quick", "--out",
                          str(tmp_path / "gpu_check")], cwd=ROOT / "benchmarks", capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MATCH" in run.stdout and (tmp_path / "gpu_check.json").is_file()
