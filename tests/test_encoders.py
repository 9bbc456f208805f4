"""Real open_clip code with random weights (tiny config) and checkpoints saved and reloaded from files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reco_qdrant import Memory, RecoClassifier, load_encoder, train_fusion
from reco_qdrant.ingest import ingest
from reco_qdrant.memory import EncoderMismatchError
from reco_qdrant.sources import ImageFolder


def test_tiny_encoder_outputs(tiny_encoder):
    im = [Image.new("RGB", (50, 30), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 200))]
    v = tiny_encoder.encode_images(im)
    t = tiny_encoder.encode_texts(["a red thing", "a blue thing", "x"])
    assert v.shape == (2, 64) and t.shape == (3, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert tiny_encoder.id == "open_clip/reco-tiny/random-seed0"


def test_checkpoint_file_loads_identically(tiny_encoder, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}, str(path))
    other = load_encoder("reco-tiny", str(path), device="cpu")  # the real pretrained=<file> path
    assert other.id.startswith("open_clip/reco-tiny/file-sha256:")
    texts = ["a photo of a bird", "a photo of a flower"]
    np.testing.assert_array_equal(other.encode_texts(texts), tiny_encoder.encode_texts(texts))
    im = [Image.new("RGB", (64, 64), (i * 40, 100, 200 - i * 40)) for i in range(3)]
    np.testing.assert_array_equal(other.encode_images(im), tiny_encoder.encode_images(im))
    torch.save(tiny_encoder.model.state_dict(), tmp_path / "tiny.pt")  # a torch file loads weights_only
    assert load_encoder("reco-tiny", str(tmp_path / "tiny.pt"), device="cpu").encode_texts(texts).shape == (2, 64)
    with Memory.open(":memory:", encoder=tiny_encoder) as mem:
        mem.add_embeddings(tiny_encoder.encode_images(im), tiny_encoder.encode_texts(["a", "b", "c"]),
                           ["a", "b", "c"], encoder_id=tiny_encoder.id)
        with pytest.raises(EncoderMismatchError, match="was built with encoder 'open_clip/reco-tiny/random-seed0'"):
            mem.check_encoder(other.id, other.dim)
        with pytest.raises(EncoderMismatchError):
            RecoClassifier(mem, None, encoder=other, use_retrieval=False)


def test_classifier_end_to_end_on_generated_images(tiny_encoder, tmp_path):
    """Generated images + captions -> memory -> trained fusion -> predict on image files."""
    import polars as pl

    rng = np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for name, c in colors.items():
        for i in range(12):
            arr = np.clip(np.array(c) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{name}_{i}.png")
            rows.append({"file": f"{name}_{i}.png", "caption": f"a {name} square, picture {i}"})
    pl.DataFrame(rows).write_parquet(tmp_path / "captions.parquet")
    with Memory.open(str(tmp_path / "m"), encoder=tiny_encoder) as mem:
        ingest(mem, ImageFolder(folder, tmp_path / "captions.parquet"), tiny_encoder, progress=False)
        paths = [folder / r["file"] for r in rows]
        img = tiny_encoder.encode_images(paths)
        txt = tiny_encoder.encode_texts([r["caption"] for r in rows])
        labels = np.repeat(np.arange(4), 12)
        fusion = train_fusion(mem, img, txt, labels=labels, k=5, epochs=2, batch_size=16, val_fraction=0,
                              n_heads=4, progress=False, device="cpu", cache_dir=str(tmp_path / "c"))
        clf = RecoClassifier(mem, fusion, encoder=tiny_encoder).set_classes(list(colors), ["a {} square."])
        pred = clf.predict(paths[::12])
        proba = clf.predict_proba(paths[::12])
    assert len(pred) == 4 and set(pred) <= set(colors)
    assert proba.shape == (4, 4)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)


def _hf_clip_folder(root):
    """A local Hugging Face CLIPModel folder with random weights and open_clip's bundled BPE vocabulary."""
    import gzip
    import json

    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root.mkdir()
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {specials.get(k, k): v for k, v in SimpleTokenizer().encoder.items()}
    (root / "vocab.json").write_text(json.dumps(vocab))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(proc, tok).save_pretrained(root)
    return root


def test_sentence_transformers_clip_folder(tmp_path):
    """A local CLIPModel folder through sentence-transformers: same embeddings as transformers, into a memory."""
    from transformers import CLIPModel, CLIPProcessor

    folder = _hf_clip_folder(tmp_path / "hf-clip")
    enc = load_encoder(str(folder), kind="sentence-transformers", device="cpu")
    assert enc.dim == 16 and enc.id.startswith("sentence-transformers/dir-sha256:")
    texts = ["a photo of a red bird", "ein Foto eines Vogels", "x"]
    ims = [Image.new("RGB", (48, 40), (200, 20, 20)), Image.new("RGB", (32, 32), (20, 20, 200))]
    t, v = enc.encode_texts(texts), enc.encode_images(ims)
    assert t.shape == (3, 16) and v.shape == (2, 16) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)

    ref, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        rt = ref.get_text_features(**proc(text=texts, return_tensors="pt", padding=True))
        rv = ref.get_image_features(**proc(images=ims, return_tensors="pt"))
    rt, rv = (getattr(x, "pooler_output", x) for x in (rt, rv))
    np.testing.assert_allclose(t, torch.nn.functional.normalize(rt, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(v, torch.nn.functional.normalize(rv, dim=-1).numpy(), atol=1e-5)
    assert load_encoder(str(folder), kind="st", device="cpu").id == enc.id  # the id is the folder's content

    with Memory.open(str(tmp_path / "mem"), encoder=enc) as mem:
        mem.add_embeddings(v, t[:2], texts[:2], encoder_id=enc.id)
        nb = mem.search(enc.encode_texts(["a photo of a red bird"]), "text", 1, "image")
        assert nb.captions[0][0] == "a photo of a red bird" and nb.scores[0, 0] > 0.999


# --------------------------------------------------------------------------- pretrained weights: fail fast


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released): connecting to it is refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(tmp_path, port: int) -> dict[str, str]:
    """The environment of a machine without internet and without cached weights: the hub is a closed local port
    (no test reaches the network), its cache an empty folder, no proxy."""
    import os

    drop = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"}
    drop |= {f"{p}_proxy" for p in ("http", "https", "all")} | {f"{p}_PROXY" for p in ("HTTP", "HTTPS", "ALL")}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf-home"),
               RECO_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    return env


def test_missing_weights_fail_fast_naming_them_and_the_ways_forward(tmp_path):
    """Default encoder, weights not cached, hub unreachable: `reco ingest images` fails at once (one
    connection attempt, no retries), names the weights and the three ways forward, and creates no memory."""
    import subprocess
    import sys
    import time

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    (tmp_path / "captions.csv").write_text("file,caption\na.png,a red square\n")
    port = _closed_port()
    env = _offline_env(tmp_path, port)
    cmd = [str(Path(sys.executable).parent / "reco"), "ingest", "images", str(folder), "--captions",
           str(tmp_path / "captions.csv"), "--memory", str(tmp_path / "m")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    flat = " ".join(r.stderr.split())
    assert r.returncode == 1, r.stdout + r.stderr
    # no retries or hang: a bound only those exceed (start-up alone takes 2-7 s on a loaded 2-core machine)
    assert elapsed < 20, f"{elapsed:.1f} s\n{r.stderr}"
    assert ("error: the pretrained weights ViT-B-32 / laion2b_s34b_b79k are not in the cache "
            f"({tmp_path / 'hf-home' / 'hub'}) and cannot be downloaded: 127.0.0.1:{port} cannot be reached") in flat
    assert "--pretrained /path/to/open_clip_model.safetensors" in flat  # 1. a local checkpoint file
    assert "from https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in flat  # (where it comes from)
    assert "HF_HOME=/path/to/dir" in flat  # 2. a cache directory
    assert "--pretrained none" in flat  # 3. random weights, a dry run
    assert "Retry" not in r.stderr and "Traceback" not in r.stderr and "--debug" not in flat
    assert not (tmp_path / "m").exists() and not (tmp_path / "hf-home").exists()

    env["HF_HUB_OFFLINE"] = "1"  # the hub's own offline switch is honoured, and said
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "offline mode is on (HF_HUB_OFFLINE is set)" in " ".join(r.stderr.split())


def _fake_hub_cache(root, repo: str, filename: str) -> Path:
    """The hub cache's layout for one file of `repo` (refs/main -> snapshots/<sha>/<filename>)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(b"weights")
    return snap / filename


def test_check_weights_reads_the_cache_and_names_what_is_missing(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from reco_qdrant.encoders import WeightsUnavailableError, check_weights, unreachable

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match=r"ViT-B-32 / laion2b_s34b_b79k .*HF_HUB_OFFLINE") as e:
        check_weights("ViT-B-32", "laion2b_s34b_b79k")
    assert [f for f, _ in e.value.fixes] == ["pretrained=FILE", "HF_HOME=DIR", "pretrained=None"]
    assert e.value.where == "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    cached = _fake_hub_cache(tmp_path / "hub", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors")
    assert check_weights("ViT-B-32", "laion2b_s34b_b79k") == "cached"  # then loaded offline: no network at all
    cached.unlink()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    port = _closed_port()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(WeightsUnavailableError, match=f"127.0.0.1:{port} cannot be reached"):
        check_weights("ViT-B-32", "laion2b_s34b_b79k")
    assert "cannot be reached" in unreachable(f"http://127.0.0.1:{port}")
    import socket

    with socket.socket() as server:  # a host that answers: the download may go ahead
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert unreachable(constants.ENDPOINT) is None
        assert check_weights("ViT-B-32", "laion2b_s34b_b79k") == "download"

    with pytest.raises(ValueError, match="no pretrained weights 'laion2b_nope' for ViT-B-32: its tags are .*"
                                         "laion2b_s34b_b79k"):
        check_weights("ViT-B-32", "laion2b_nope")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        check_weights("ViT-B-32", str(tmp_path / "missing.bin"))
    assert check_weights("ViT-B-32", None) is None  # random weights: nothing to fetch
    assert check_weights("reco-tiny", "anything") is None  # no tags for our config: open_clip says what is wrong


def test_check_weights_accepts_only_the_file_open_clip_loads(tmp_path, monkeypatch):
    """A cached `open_clip_pytorch_model.safetensors` is not what open_clip loads for a tag whose file is
    `open_clip_pytorch_model.bin` (it tries `open_clip_model.safetensors`, then the .bin): not "cached"."""
    from huggingface_hub import constants

    from reco_qdrant.encoders import WeightsUnavailableError, check_weights

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    stray = _fake_hub_cache(tmp_path / "hub", repo, "open_clip_pytorch_model.safetensors")
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        check_weights("ViT-B-32", "laion2b_s34b_b79k")
    (stray.parent / "open_clip_pytorch_model.bin").write_bytes(b"weights")  # the tag's own file
    assert check_weights("ViT-B-32", "laion2b_s34b_b79k") == "cached"


def test_a_proxy_without_a_scheme_is_an_http_proxy(tmp_path, monkeypatch):
    """`https_proxy=localhost:PORT` (no scheme, as httpx and huggingface_hub read it: http://) is probed at
    localhost:PORT, not reported as ":80 cannot be reached"."""
    import socket

    from reco_qdrant.encoders import unreachable

    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    hub = "https://huggingface.co"
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        monkeypatch.setenv("https_proxy", f"localhost:{proxy.getsockname()[1]}")
        assert unreachable(hub) is None
        monkeypatch.setenv("https_proxy", f"127.0.0.1:{proxy.getsockname()[1]}")
        assert unreachable(hub) is None
    port = _closed_port()
    monkeypatch.setenv("https_proxy", f"localhost:{port}")
    why = unreachable(hub)
    assert why is not None and why.startswith(f"the proxy localhost:{port} cannot be reached"), why
