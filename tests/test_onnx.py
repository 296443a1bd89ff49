"""ONNX bundles and the ONNX Runtime backend against the oracle (transformers on the same
checkpoint), the torch-free runtime path, and one clear line for broken bundles."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import m4
from m4.bundle_format import FORMAT_VERSION, ORT_DECODER
from m4.errors import M4Error
from m4.export.bundle import OPSET, export_bundle
from m4.info import describe
from m4.media import preprocess

from conftest import GRAPHS, VARIANTS, random_images
from test_cli import m4_in_process
from test_parity import QUESTIONS, oracle_tokens


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_greedy_tokens_equal_transformers(checkpoints, oracle, models, variant, n_images, graph):
    model = models[variant, graph]
    assert model.backend.name == "onnx" and model.backend.fused == (graph == ORT_DECODER)
    images = random_images(n_images, seed=n_images)
    question = QUESTIONS[n_images]
    p, pictures = model.prepare(question, images, None, None, False)
    ours = list(model.tokens(question, images=images, max_new_tokens=12))
    assert len(ours) == 12
    assert ours == oracle_tokens(oracle(checkpoints[variant]), model, p, pictures, 12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_video_frames_equal_transformers(checkpoints, oracle, models, variant):
    model = models[variant, ORT_DECODER]
    frames = random_images(8, seed=11)
    question = "Which way does the ball move?"
    p, pictures = model.prepare(question, None, frames, None, False)
    assert p.n_images == 8
    ours = list(model.tokens(question, video=frames, max_new_tokens=10))
    assert ours == oracle_tokens(oracle(checkpoints[variant]), model, p, pictures, 10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_embeddings_match_transformers(checkpoints, oracle, models, variant):
    model = models[variant, ORT_DECODER]
    pixels = preprocess(random_images(3, seed=5), model.processing)
    with torch.no_grad():
        out = oracle(checkpoints[variant]).get_image_features(pixel_values=torch.from_numpy(pixels))
    ref = torch.stack(list(out.pooler_output)).numpy()
    ours = model.backend.encode_images(pixels)
    assert ours.shape == ref.shape == (3, model.arch.tokens_per_image, model.arch.text.hidden)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("graph", GRAPHS)
def test_cache_rollback_and_chunked_prefill_match_torch(checkpoints, paths, graph):
    """The live context's use of a cache: prefill, decode, roll back to an earlier position
    and prefill again there; chunked prefill gives what one pass gives."""
    variant = "gqa-untied-penult-full"
    onnx_b = m4.load(paths[variant, graph]).backend
    torch_b = m4.load(checkpoints[variant], backend="torch").backend
    onnx_b.chunk = 7  # several chunks per prefill, one of them partial
    embeds = np.random.default_rng(0).normal(0, 1, (40, onnx_b.arch.text.hidden)).astype(np.float32)
    calls = [(0, 30, False), (30, 31, True), (31, 32, True), (12, 29, False), (29, 30, True), (30, 40, True)]
    oc, tc = onnx_b.new_cache(48), torch_b.new_cache(48)
    for start, end, last_only in calls:  # positions [start, end) take embeds[start:end]
        ours = onnx_b.forward(embeds[start:end], start, oc, last_only)
        ref = torch_b.forward(torch.from_numpy(embeds[start:end]), start, tc, last_only)
        assert ours.shape == ref.shape == ((1 if last_only else end - start), onnx_b.arch.text.vocab)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["mha-untied-penult-default", "llama3.1-clip-gqa-untied-last-full"])
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("exact", [True, False])
def test_live_context_runs_on_a_bundle(checkpoints, models, exact, graph, variant):
    """The live context, unchanged, on the ONNX backend: exact eviction answers as a fresh
    prompt over the window does, and approximate eviction (shifted, re-rotated keys, Llama
    3.1's scaled angles too) as the torch backend's does."""
    ours = models[variant, graph].stream(window=3, exact=exact)
    ref = m4.load(checkpoints[variant], backend="torch").stream(window=3, exact=exact)
    frames = random_images(5, seed=4)
    for k, f in enumerate(frames, start=1):
        ours.add_frame(f)
        ref.add_frame(f)
        if k in (2, 4, 5):
            answer = list(ours.tokens("What is happening?", max_new_tokens=8))
            assert answer == list(ref.tokens("What is happening?", max_new_tokens=8)), f"after {k} frames"
            if exact:
                window = frames[max(0, k - 3):k]
                assert answer == list(models[variant, graph].tokens("What is happening?", video=window, max_new_tokens=8))


def test_graphs_are_standard_onnx(bundles):
    for name in ("vision.onnx", "decoder.onnx"):
        g = onnx.load(bundles["gqa-tied-last-full"] / name)
        assert {(o.domain or "ai.onnx", o.version) for o in g.opset_import} >= {("ai.onnx", OPSET)}
        assert {n.domain for n in g.graph.node} <= {"", "ai.onnx"}
    # one symbolic batch and cache length for every layer: keys (B, kv, D, M), values (B, kv, M, D)
    dims = {i.name: tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim) for i in g.graph.input}
    assert {d for k, d in dims.items() if k.startswith("past_key")} == {("batch", 2, 16, "cache")}
    assert {d for k, d in dims.items() if k.startswith("past_value")} == {("batch", 2, "cache", 16)}
    assert dims["inputs_embeds"][0] == dims["past_len"][0] == "batch"


def test_cpu_decoder_is_fused(bundles, models):
    """decoder_ort.onnx: per layer one GroupQueryAttention (rotary and cache inside) and two
    fused norms; its cache inputs and outputs are one (batch, kv, M, D) buffer each."""
    g = onnx.load(bundles["gqa-tied-last-full"] / ORT_DECODER)
    layers = models["gqa-tied-last-full", ORT_DECODER].arch.text.layers
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("GroupQueryAttention") == layers and ops.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1
    assert len(ops) <= 10 * layers + 12
    dims = {v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in [*g.graph.input, *g.graph.output] if "_key." in v.name or "_value." in v.name}
    assert set(dims.values()) == {("batch", 2, "cache", 16)} and len(dims) == 4 * layers


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_cpu_decoder_other_activations(checkpoints, tmp_path, act):
    """decoder_ort.onnx writes each MLP activation as its contrib op: the same logits as the
    torch backend (held against transformers in test_parity) on a checkpoint using it."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    for f in checkpoints["gqa-tied-last-full"].iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    config = json.loads((ck / "config.json").read_text())
    config["text_config"]["hidden_act"] = act
    (ck / "config.json").write_text(json.dumps(config))
    export_bundle(str(ck), tmp_path / "bundle")
    ours, ref = m4.load(tmp_path / "bundle").backend, m4.load(ck, backend="torch").backend
    assert ours.fused and ours.arch.text.act == act
    embeds = np.random.default_rng(1).normal(0, 1, (9, ours.arch.text.hidden)).astype(np.float32)
    logits = ours.forward(embeds, 0, ours.new_cache(9), last_only=False)
    expected = ref.forward(torch.from_numpy(embeds), 0, ref.new_cache(9), last_only=False)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_manifest_and_info(bundles):
    m = json.loads((bundles["mha-untied-penult-default"] / "m4.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["quantisation"] is None and m["template"] == "qwen_1_5"
    assert m["dtypes"][ORT_DECODER] == "fp32" and m["files"][ORT_DECODER]["bytes"] > 0
    assert m["tokens_per_image"] == 15  # 16 patches, "default" drops the first
    d = describe(str(bundles["mha-untied-penult-default"]))
    assert d["bundle"]["dtype"] == "fp32" and d["bundle"]["files"]["decoder.onnx"]["bytes"] > 0
    assert d["tokens_per_image"] == 15 and d["decoder"]["kv_heads"] == 4


RUNTIME_ONLY = """
import sys
import numpy as np
import m4
model = m4.load(sys.argv[1])
print(model.ask("Describe <image>.", images=[np.zeros((40, 48, 3), np.uint8)], max_new_tokens=4) is not None)
heavy = sorted({n.split(".")[0] for n in sys.modules} & {"torch", "transformers"})
print("imported:", heavy)
"""


def test_runtime_path_does_not_import_torch(bundles):
    r = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(bundles["gqa-tied-last-full"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["True", "imported: []"]


def test_cli_runs_a_bundle(bundles, tmp_path):
    from PIL import Image

    Image.fromarray(random_images(1)[0]).save(tmp_path / "a.png")
    r = m4_in_process("run", "--model", bundles["gqa-tied-last-full"], "--images", tmp_path / "a.png", "--prompt",
                      "What is it?", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["event"] == "answer"


def broken_bundle(src, dst, case):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if case == "corrupt onnx":  # same size, so only parsing can tell; the decoder the CPU loads
        data = bytearray((dst / ORT_DECODER).read_bytes())
        data[: len(data) // 2] = b"\x07" * (len(data) // 2)
        (dst / ORT_DECODER).write_bytes(bytes(data))
    elif case == "changed decoder.onnx":  # one byte flipped
        data = bytearray((dst / "decoder.onnx").read_bytes())
        data[len(data) // 2] ^= 1
        (dst / "decoder.onnx").write_bytes(bytes(data))
    elif case == "truncated onnx":
        (dst / "vision.onnx").write_bytes((dst / "vision.onnx").read_bytes()[:1000])
    elif case == "no manifest":
        (dst / "m4.json").unlink()
    elif case == "unknown version":
        m = json.loads((dst / "m4.json").read_text())
        (dst / "m4.json").write_text(json.dumps({**m, "format_version": 1}))  # a bundle of an older m4
    return dst


@pytest.mark.parametrize("case, message", [
    ("corrupt onnx", f"{ORT_DECODER} does not match m4.json"), ("truncated onnx", "truncated"),
    ("no manifest", "no m4.json"), ("unknown version", "format 1 .* export it again with `m4 export ")])
def test_broken_bundle_is_one_clear_error(bundles, tmp_path, case, message):
    bad = broken_bundle(bundles["gqa-tied-last-full"], tmp_path / "bad", case)
    with pytest.raises(M4Error, match=message) as e:
        m4.load(bad)
    assert "\n" not in str(e.value)
    if case == "corrupt onnx":  # unverified, ONNX Runtime cannot parse it: the CLI says so in one line, exit 2
        r = subprocess.run([sys.executable, "-m", "m4", "run", "--model", bad, "--prompt", "q"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "M4_VERIFY": "0"})
        assert r.returncode == 2 and r.stderr.startswith("m4: error: cannot load") and r.stderr.count("\n") == 1


def test_a_changed_file_is_caught_before_any_answer(bundles, tmp_path):
    """One byte flipped in decoder.onnx, which the CPU does not even run (it runs the fused
    twin): the bundle would load and answer. Loading checks every file's sha256."""
    bad = broken_bundle(bundles["gqa-tied-last-full"], tmp_path / "bad", "changed decoder.onnx")
    with pytest.raises(M4Error, match=r"bad/decoder.onnx does not match m4.json") as e:
        m4.load(bad)
    assert "\n" not in str(e.value)
    assert m4.load(bad, verify=False).ask("What is it?", max_new_tokens=2) is not None  # skipped on request

    def verify(path):
        return subprocess.run([sys.executable, "-m", "m4", "verify", path], capture_output=True, text=True,
                              timeout=120)

    r = verify(bad)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("m4: error: 1 of ") and "decoder.onnx" in r.stderr and r.stderr.count("\n") == 1
    lines = r.stdout.splitlines()
    assert "MISMATCH  decoder.onnx: its contents changed (sha256 differs)" in lines
    assert sum(line.startswith("OK ") for line in lines) == len(lines) - 1
    good = verify(bundles["gqa-tied-last-full"])
    assert good.returncode == 0 and good.stderr == "" and all(line.startswith("OK ") for line in good.stdout.splitlines())
    r = verify(tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("m4: error:") and "not a bundle" in r.stderr


def test_fp16_bundle_is_close_to_fp32(checkpoints, models, tmp_path):
    m = export_bundle(str(checkpoints["gqa-tied-last-full"]), tmp_path / "half", dtype="fp16")
    assert m["dtype"] == "fp16" and m["dtypes"]["decoder.onnx"] == "fp16"
    half, full = m4.load(tmp_path / "half"), models["gqa-tied-last-full", ORT_DECODER]
    p, pictures = full.prepare(QUESTIONS[2], random_images(2, seed=3), None, None, False)
    embeds = half.embed(p, pictures)
    assert embeds.dtype == np.float16 and half.backend.fused
    ours = half.backend.forward(embeds, 0, half.backend.new_cache(len(p.ids)), last_only=False)
    ref = full.backend.forward(full.embed(p, pictures), 0, full.backend.new_cache(len(p.ids)), last_only=False)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-2 * np.abs(ref).max(), rtol=0)


def test_export_replaces_only_bundles(checkpoints, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(M4Error, match="not a bundle"):
        export_bundle(str(checkpoints["gqa-tied-last-full"]), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("head_dim", [8, 12, 64])
def test_bundles_of_any_head_size_answer_as_transformers(oracle, tmp_path, head_dim):
    """ONNX Runtime's fused attention refuses head sizes that are not multiples of 16: such
    bundles carry decoder.onnx alone, and both kinds answer as the oracle does."""
    from conftest import save_tiny_checkpoint

    ck = save_tiny_checkpoint(tmp_path / "ck", "gqa-untied-penult-full", seed=3, hidden=4 * head_dim, heads=4)
    export_bundle(str(ck), tmp_path / "b")
    model = m4.load(tmp_path / "b")
    assert model.arch.text.head_dim == head_dim
    assert model.backend.fused == (head_dim % 16 == 0) == (tmp_path / "b" / ORT_DECODER).is_file()
    images = random_images(2, seed=head_dim)
    p, pictures = model.prepare(QUESTIONS[2], images)
    ours = list(model.tokens(QUESTIONS[2], images=images, max_new_tokens=10))
    assert ours == oracle_tokens(oracle(ck), model, p, pictures, 10)
    assert ours == list(m4.load(ck, backend="torch").tokens(QUESTIONS[2], images=images, max_new_tokens=10))
