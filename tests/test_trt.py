"""The TensorRT backend: one clear line wherever a bundle's engines cannot run (these tests
run anywhere), and, where TensorRT and a CUDA GPU are present, engines built with m4 build
answering as the oracle (transformers on the same checkpoint) does."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import m4
from m4.bundle_format import MANIFEST, file_record
from m4.errors import M4Error
from m4.export.engines import profiles
from m4.machine import gpu_name
from m4.media import preprocess

from conftest import random_images
from test_cli import m4 as cli
from test_parity import QUESTIONS, oracle_tokens

VARIANT = "gqa-tied-last-full"


@pytest.fixture(scope="session")
def bundles(bundles):
    """Two of the session's bundles (conftest.py): those these tests build engines for."""
    return {v: bundles[v] for v in (VARIANT, "mha-untied-penult-default")}


def with_engines(src, dst, gpu: str, tensorrt: str = "10.3.0"):
    """A copy of bundle `src` as m4 build on `gpu` with `tensorrt` leaves it: engines/*.plan
    listed in m4.json with the record. The plans' bytes stand for engines made on that machine;
    no test here deserialises them (the record rules them out first)."""
    shutil.copytree(src, dst)
    (dst / "engines").mkdir()
    m = json.loads((dst / MANIFEST).read_text())
    for name in ("vision.plan", "decoder.plan"):
        (dst / "engines" / name).write_bytes(b"engine built on " + gpu.encode())
        m["files"][f"engines/{name}"] = file_record(dst / "engines" / name)
    shapes = profiles(m, 4, 256)
    m["engines"] = {"tensorrt": tensorrt, "gpu": gpu, "fp16": False, "max_images": 4, "max_context": 256,
                    "profiles": {k: [{n: list(map(list, s)) for n, s in p.items()} for p in v]
                                 for k, v in shapes.items()}}
    (dst / MANIFEST).write_text(json.dumps(m, indent=2))
    return dst


def one_line(bundle, message: str) -> None:
    """m4.load and the CLI both refuse backend trt with `message`; auto runs ONNX Runtime."""
    with pytest.raises(M4Error, match=message) as e:
        m4.load(bundle, backend="trt")
    assert "\n" not in str(e.value)
    r = cli("run", "--model", bundle, "--backend", "trt", "--prompt", "What is it?")
    assert r.returncode == 2 and r.stderr.startswith("m4: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert re.search(message, r.stderr)
    assert m4.load(bundle).backend.name == "onnx"


def test_bundle_without_engines(bundles):
    b = bundles[VARIANT]
    one_line(b, f"{b} has no TensorRT engines: build them on this device with m4 build {b}")


def test_engines_for_another_gpu(bundles, tmp_path):
    other = "NVIDIA Jetson AGX Orin Developer Kit"
    other = other if gpu_name() != other else "NVIDIA H100 80GB HBM3"
    b = with_engines(bundles[VARIANT], tmp_path / "orin", other)
    one_line(b, f"engines were built for {other} \\(TensorRT 10.3.0\\) and this machine has .*rebuild them here "
                f"with m4 build {b}")


@pytest.mark.skipif(gpu_name() != "unknown", reason="a GPU is named here")
def test_engines_without_a_gpu_say_so(bundles, tmp_path):
    b = with_engines(bundles[VARIANT], tmp_path / "orin", "Orin")
    one_line(b, "this machine has no GPU that nvidia-smi or the Jetson device tree names")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_missing(bundles, tmp_path):
    """Engines m4 build made for this machine's GPU, and no tensorrt: what to install, and
    which version the engines want."""
    b = with_engines(bundles[VARIANT], tmp_path / "here", gpu_name(), tensorrt="10.3.0")
    one_line(b, "the trt backend needs TensorRT's Python API, which is not installed here: on Jetson it comes "
                "with JetPack 6, elsewhere pip install tensorrt \\(the engines want TensorRT 10.3.0\\)")


def test_checkpoint_needs_export_and_build(checkpoints):
    with pytest.raises(M4Error, match="export it first .*then m4 build OUT"):
        m4.load(checkpoints[VARIANT], backend="trt")


def test_bench_names_what_trt_needs(bundles, checkpoints, tmp_path):
    """trt in m4 bench: a bundle without engines, and a checkpoint, each skipped with one line."""
    b = bundles[VARIANT]
    r = cli("bench", "--model", b, "--backends", "trt", "--json", tmp_path / "b.json", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    skipped = json.loads((tmp_path / "b.json").read_text())["skipped"]
    assert skipped == {"trt": f"{b} has no TensorRT engines: build them on this device with m4 build {b}"}
    r = cli("bench", "--model", checkpoints[VARIANT], "--backends", "trt", "--json", tmp_path / "c.json",
            cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "pass --model BUNDLE after m4 build" in json.loads((tmp_path / "c.json").read_text())["skipped"]["trt"]


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None or gpu_name() != "unknown",
                    reason="needs cuda-python on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line():
    from m4.runtime.trt_backend import Cuda

    with pytest.raises(M4Error, match="CUDA cudaStreamCreate failed: cudaError") as e:
        Cuda()
    assert "\n" not in str(e.value)


IMPORTS = """
import sys
import m4.runtime.trt_backend
print(sorted({n.split(".")[0] for n in sys.modules} & {"torch", "transformers", "tensorrt", "onnxruntime"}))
"""


def test_backend_imports_neither_torch_nor_tensorrt():
    """numpy only: and tensorrt itself is imported only when a bundle's engines are checked."""
    r = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# -- on a GPU with TensorRT ---------------------------------------------------------------

@pytest.fixture(scope="session")
def built(bundles, tmp_path_factory):
    """The bundles with engines built here by `m4 build` (fp32, 4 images, 256 positions)."""
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT (JetPack 6 on Jetson, pip install tensorrt)")
    pytest.importorskip("cuda", reason="needs cuda-python (pip install 'm4-vlm[trt]')")
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as e:  # no CUDA device or driver
        pytest.skip(f"needs a CUDA GPU for TensorRT ({e})")
    root = tmp_path_factory.mktemp("trt-built")
    out = {}
    for v, b in bundles.items():
        out[v] = shutil.copytree(b, root / v)
        r = cli("build", out[v], "--max-images", "4", "--max-context", "256")
        assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("variant", [VARIANT, "mha-untied-penult-default"])
@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_greedy_tokens_equal_transformers(built, checkpoints, oracle, variant, n_images):
    model = m4.load(built[variant])  # auto: the engines run here
    assert model.backend.name == "trt"
    images = random_images(n_images, seed=n_images)
    p, pictures = model.prepare(QUESTIONS[n_images], images, None, None, False)
    ours = list(model.tokens(QUESTIONS[n_images], images=images, max_new_tokens=12))
    assert len(ours) == 12
    assert ours == oracle_tokens(oracle(checkpoints[variant]), model, p, pictures, 12)


def test_vision_embeddings_match_transformers(built, checkpoints, oracle):
    """Six images through a profile of four: two runs."""
    model = m4.load(built[VARIANT], backend="trt")
    pixels = preprocess(random_images(6, seed=5), model.processing)
    with torch.no_grad():
        out = oracle(checkpoints[VARIANT]).get_image_features(pixel_values=torch.from_numpy(pixels))
    ref = torch.stack(list(out.pooler_output)).numpy()
    ours = model.backend.encode_images(pixels)
    assert ours.shape == ref.shape
    # TensorRT may run fp32 matmuls in TF32
    np.testing.assert_allclose(ours, ref, atol=2e-3 * np.abs(ref).max(), rtol=0)


def test_cache_rollback_and_chunked_prefill_match_torch(built, checkpoints):
    """The live context's use of a cache (prefill, decode, roll back, prefill again), prefill
    in chunks of 7, against the torch backend."""
    ours = m4.load(built[VARIANT], backend="trt").backend
    ref = m4.load(checkpoints[VARIANT], backend="torch").backend
    ours.chunk = 7
    embeds = np.random.default_rng(0).normal(0, 1, (40, ours.arch.text.hidden)).astype(np.float32)
    calls = [(0, 30, False), (30, 31, True), (31, 32, True), (12, 29, False), (29, 30, True), (30, 40, True)]
    oc, tc = ours.new_cache(48), ref.new_cache(48)
    for start, end, last_only in calls:
        logits = ours.forward(embeds[start:end], start, oc, last_only)
        expected = ref.forward(torch.from_numpy(embeds[start:end]), start, tc, last_only).numpy()
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits, expected, atol=2e-3 * np.abs(expected).max(), rtol=0)


def test_live_context_evicts_exactly(built):
    model = m4.load(built[VARIANT], backend="trt")
    live, frames = model.stream(window=3), random_images(5, seed=4)
    for f in frames:
        live.add_frame(f)
    answer = list(live.tokens("What is happening?", max_new_tokens=8))
    assert answer == list(model.tokens("What is happening?", video=frames[-3:], max_new_tokens=8))
    with pytest.raises(M4Error, match="approximate eviction is not available on the trt backend"):
        model.stream(window=3, exact=False)


def test_context_beyond_the_engines_is_one_line(built):
    backend = m4.load(built[VARIANT], backend="trt").backend
    with pytest.raises(M4Error, match="exceeds the engines' 256: rebuild them with m4 build --max-context"):
        backend.new_cache(300)


def test_reuse_answers_as_cold(built):
    """Prefixes copied out of a context's buffers and into another's (TrtCache.copy_to), one
    cut inside an image: every answer the cold one, alone and batched (tests/test_reuse.py)."""
    from test_reuse import check_alone_and_batched, check_inside_an_image

    model = m4.load(built[VARIANT], backend="trt")
    check_alone_and_batched(model)
    check_inside_an_image(model)
