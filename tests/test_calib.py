"""`m4 calibrate` and `m4 build`: INT8 Q/DQ vision graphs, weight-only and W8A8 decoders,
measured against the float bundle (itself held equal to transformers in test_onnx.py) and
against the oracle; bad calibration data and a machine without TensorRT are one clear line."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

import m4
from m4.bundle_format import DECODER_WEIGHTS, ORT_DECODER, manifest_arch, read_manifest, sha256
from m4.calib.bundle import calibrate, embed_samples
from m4.calib.data import load_samples
from m4.calib.decoder import input_absmax, prefill_feeds, smooth, weight_matmuls
from m4.calib.measure import answer, answers_equal
from m4.calib.reference import Reference
from m4.errors import M4Error
from m4.eval import evaluate
from m4.export.bundle import export_bundle
from m4.media import DemoScene, preprocess, write_video
from m4.plan import needs
from m4.model.checkpoint import random_checkpoint
from m4.train.synth import synth

from conftest import GRAPHS, VARIANTS, random_images
from test_export import places
from test_parity import QUESTIONS, oracle_tokens

VARIANT = "gqa-tied-last-full"


def greedy(backend, embeds: np.ndarray, n: int) -> list[int]:
    """n greedy tokens after `embeds`, stop tokens included (agreement is per position)."""
    cache = backend.new_cache(len(embeds) + n)
    logits, out = backend.forward(embeds, 0, cache)[-1], []
    for i in range(n):
        out.append(int(logits.argmax()))
        if i + 1 < n:
            logits = backend.forward(backend.embed_tokens(out[-1:]), len(embeds) + i, cache)[-1]
    return out


def teacher_forced(backend, embeds: np.ndarray, answer: list[int]) -> np.ndarray:
    """Logits predicting each answer token, (len(answer), vocab), from one prefill."""
    seq = np.concatenate([embeds, backend.embed_tokens(answer[:-1])])
    logits = backend.forward(seq, 0, backend.new_cache(len(seq)), last_only=False)
    return logits[len(embeds) - 1:]


@pytest.fixture(scope="session")
def float_bundle(bundles):
    return bundles[VARIANT]


@pytest.fixture(scope="session")
def quantised(float_bundle, tmp_path_factory):
    """Quantised bundles by decoder scheme (vision INT8 in each), made once when first asked for."""
    made = {}

    def get(decoder):
        if decoder not in made:
            out = tmp_path_factory.mktemp("q") / decoder
            calibrate(float_bundle, out, "demo", vision="int8", decoder=decoder, samples=8)
            made[decoder] = out
        return made[decoder]

    return get


def held_out_pixels(size: int) -> np.ndarray:
    """Frames neither calibration (demo seeds 0..9) nor the report saw: other scenes and noise."""
    scene = DemoScene(seed=1000)
    return preprocess([scene.frame(i) for i in (0, 50, 99)] + random_images(3, seed=99), size)


def producer(g: onnx.GraphProto) -> dict:
    return {o: n for n in g.node for o in n.output}


def test_int8_vision_has_qdq_around_matmuls_and_float_patch_embedding(quantised):
    g = onnx.load(quantised("int8") / "vision.onnx").graph
    made_by, weights = producer(g), {i.name: i for i in g.initializer}
    linear = [n for n in g.node if n.op_type in ("MatMul", "Conv")
              and any(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear"
                      and made_by[i].input[0] in weights for i in n.input)]
    # every MatMul with weights (the layers' projections, the projector) reads INT8 weights;
    # the Conv over the pixels stays float (m4/calib/vision.py)
    assert {n.op_type for n in linear} == {"MatMul"}
    assert len(linear) >= 3 and not any(n.op_type == "MatMul" and n.input[1] in weights for n in g.node)
    conv = next(n for n in g.node if n.op_type == "Conv")
    assert all(made_by.get(i) is None or made_by[i].op_type != "DequantizeLinear" for i in conv.input)
    for n in linear:  # weights int8 per channel, activations from a Q -> DQ pair, zero points 0
        dq_x, dq_w = made_by[n.input[0]], made_by[n.input[1]]
        assert dq_x.op_type == dq_w.op_type == "DequantizeLinear"
        assert made_by[dq_x.input[0]].op_type == "QuantizeLinear"
        w = numpy_helper.to_array(weights[dq_w.input[0]])
        assert w.dtype == np.int8 and numpy_helper.to_array(weights[dq_w.input[1]]).size > 1
        assert not numpy_helper.to_array(weights[dq_x.input[2]]).any()
    # norms and softmax stay float
    assert {n.op_type for n in g.node} >= {"LayerNormalization", "Softmax"}


def held_out_embeddings(ref, q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quantised and the float bundle's image tokens for held-out pixels; their cosines."""
    pixels = held_out_pixels(ref.arch.vision.image_size)
    a, r = q.backend.encode_images(pixels), ref.backend.encode_images(pixels)
    return a, r, (a * r).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(r, axis=-1)


def test_int8_vision_embeddings_close_to_float(float_bundle, quantised):
    a, r, cos = held_out_embeddings(m4.load(float_bundle), m4.load(quantised("int8")))
    assert cos.min() >= 0.99, cos.min()
    assert 0 < np.abs(a - r).max() < 0.1 * np.abs(r).max()  # quantised: close, not equal


@pytest.mark.parametrize("decoder, bits, ratio", [("int4", 4, 0.20), ("int8", 8, 0.35)])
def test_weight_only_decoders_load_answer_and_shrink(float_bundle, quantised, decoder, bits, ratio):
    out = quantised(decoder)
    m = json.loads((out / "m4.json").read_text())
    assert m["quantisation"]["decoder.onnx"]["scheme"] == f"{decoder}-weight-only"
    assert m["calibration"]["source"] == "demo" and m["calibration"]["held_out"] >= 1
    model = m4.load(out)
    assert isinstance(model.ask("Describe <image>.", images=random_images(1), max_new_tokens=4), str)
    # the weights MatMulNBits replaced, against their fp32 bytes (the tiny graph is mostly RoPE tables)
    g, f = onnx.load(out / "decoder.onnx").graph, onnx.load(float_bundle / "decoder.onnx").graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(weight_matmuls(onnx.load(float_bundle / "decoder.onnx")))
    assert all(a.i == bits for n in nbits for a in n.attribute if a.name == "bits")
    sizes = {i.name: len(i.raw_data) for i in g.initializer}
    quant = sum(sizes[x] for n in nbits for x in n.input[1:] if x in sizes)
    fp32 = sum(len(i.raw_data) for i in f.initializer if len(i.dims) == 2 and i.name not in ("text.cos", "text.sin"))
    assert quant <= ratio * fp32
    report = json.loads((out / "report.json").read_text())
    assert report["size_bytes"]["decoder.onnx"]["quantised"] < report["size_bytes"]["decoder.onnx"]["float"]
    # the fused twin that the CPU runs is quantised alike: every weight MatMul (the lm_head
    # included) a MatMulNBits of the same bits and block size, none left float, recorded and hashed
    fg, qg = onnx.load(float_bundle / ORT_DECODER), onnx.load(out / ORT_DECODER)
    fused = [n for n in qg.graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == len(weight_matmuls(fg)) and not weight_matmuls(qg)
    assert any(n.output[0] == "logits" for n in fused)
    assert {nbits_attrs(n) for n in fused} == {nbits_attrs(n) for n in nbits} == {(4, bits, 32)}
    assert m["quantisation"][ORT_DECODER] == {**m["quantisation"]["decoder.onnx"], "quantised_nodes": len(fused)}
    assert m["dtypes"][ORT_DECODER] == "fp32" and m["files"][ORT_DECODER]["sha256"] == sha256(out / ORT_DECODER)
    # the float weights do not travel: the two decoder graphs share one file of quantised weights
    assert (out / DECODER_WEIGHTS).stat().st_size < (float_bundle / DECODER_WEIGHTS).stat().st_size
    assert model.backend.fused and report["decoder"]["graph"] == ORT_DECODER
    s = report["size_bytes"][ORT_DECODER]
    assert s["quantised"] < s["float"] == sum(f.stat().st_size for f in (float_bundle / ORT_DECODER,
                                                                         float_bundle / DECODER_WEIGHTS))


def nbits_attrs(n: onnx.NodeProto) -> tuple[int, int, int]:
    a = {x.name: x.i for x in n.attribute}
    return a["accuracy_level"], a["bits"], a["block_size"]


def without_fused(bundle, out):
    """The bundle without decoder_ort.onnx: the CPU runs its decoder.onnx."""
    out.mkdir()
    for f in bundle.iterdir():
        if not f.name.startswith((ORT_DECODER, "m4.json")):
            shutil.copy(f, out / f.name)
    m = json.loads((bundle / "m4.json").read_text())
    m["files"] = {f: r for f, r in m["files"].items() if not f.startswith(ORT_DECODER)}
    del m["dtypes"][ORT_DECODER]
    (out / "m4.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("decoder", ["int8", "int4"])
def test_quantised_fused_decoder_computes_the_quantised_decoder(quantised, tmp_path, decoder):
    """The same MatMulNBits weights in both graphs: decoder_ort.onnx (CPU, fused) and
    decoder.onnx of one quantised bundle predict the same tokens, teacher-forced (measured:
    all 12 of 12, logits' cosine >= 0.9999; a near tie may flip one)."""
    fused = m4.load(quantised(decoder))
    plain = m4.load(without_fused(quantised(decoder), tmp_path / "plain"))
    assert fused.backend.fused and not plain.backend.fused
    e = fused.embed(*fused.prepare(QUESTIONS[2], random_images(2, seed=41), None, None, False))
    answer = greedy(plain.backend, e, 12)
    a, b = teacher_forced(fused.backend, e, answer), teacher_forced(plain.backend, e, answer)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.999 and (a.argmax(-1) == answer).mean() >= 0.9


def test_vision_only_bundle_keeps_the_fused_float_decoder(float_bundle, tmp_path):
    out = tmp_path / "vision-int8"
    calibrate(float_bundle, out, "demo", vision="int8", decoder="none", samples=4)
    model = m4.load(out)
    assert model.backend.fused and (out / ORT_DECODER).is_file()
    assert isinstance(model.ask("Describe <image>.", images=random_images(1), max_new_tokens=4), str)


def test_an_fp16_bundle_quantises_weight_only(checkpoints, tmp_path):
    """A weight-only scheme takes an fp16 float bundle (what a large checkpoint is exported
    to): MatMulNBits with fp16 scales, measured against the fp16 bundle; calibrated INT8
    vision still asks for fp32, in one line."""
    f16 = tmp_path / "fp16"
    export_bundle(str(checkpoints[VARIANT]), f16, "fp16")
    report = calibrate(f16, tmp_path / "q", "demo", vision="none", decoder="int4", samples=2)
    assert report["decoder"]["graph"] == ORT_DECODER and report["decoder"]["cosine"] > 0.8
    scales = [t for t in onnx.load(str(tmp_path / "q" / ORT_DECODER), load_external_data=False).graph.initializer
              if t.name.endswith(".scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    with pytest.raises(M4Error, match="calibrated INT8 needs an fp32 bundle"):
        calibrate(f16, tmp_path / "v", "demo", vision="int8", decoder="none", samples=2)


# bounds measured on the tiny random checkpoint (hidden 64, wide init: the hard case for
# block-wise INT4), with margin; chance agreement is 1/384
@pytest.mark.parametrize("decoder, agreement, cosine", [("int8", 0.6, 0.99), ("int4", 0.25, 0.8)])
def test_greedy_agreement_is_measured_and_bounded(checkpoints, oracle, quantised, decoder, agreement, cosine):
    report = json.loads((quantised(decoder) / "report.json").read_text())
    d = report["decoder"]
    # measured on the graph the CPU runs: the quantised fused decoder
    assert d["graph"] == ORT_DECODER
    assert d["token_agreement"] >= agreement and 0 <= d["logit_kl"] < 0.5 and d["cosine"] > cosine
    assert set(report) >= {"vision", "decoder", "size_bytes", "end_to_end", "machine"}
    # against transformers on the float checkpoint: the quantised bundle (vision and decoder)
    # reads the oracle's prompt and answer, and predicts each answer token
    model = m4.load(quantised(decoder))
    assert model.backend.fused
    images = random_images(2, seed=21)
    p, pictures = model.prepare(QUESTIONS[2], images, None, None, False)
    ref = oracle_tokens(oracle(checkpoints[VARIANT]), model, p, pictures, 12)
    logits = teacher_forced(model.backend, model.embed(p, pictures), ref)
    assert (logits.argmax(-1) == ref).mean() >= agreement


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("graph", GRAPHS)
def test_reference_is_the_float_decoder_a_layer_at_a_time(paths, variant, graph):
    """Calibration's reference (m4's torch decoder over the float bundle's weights, read from
    one graph's initializers) gives the float bundle's logits at every position, holding one
    layer's weights at a time."""
    bundle = paths[variant, graph]
    model, reference = m4.load(bundle), Reference(bundle)
    layers = list(reference.text.layers)
    held: list[int] = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: held.append(sum(not p.is_meta for x in layers
                                                                   for p in x.parameters())))
    prompts = [model.embed(*model.prepare(QUESTIONS[2], random_images(2, seed=s), None, None, False)) for s in (1, 2)]
    for e, h in zip(prompts, reference.hidden(prompts)):
        want = model.backend.forward(e, 0, model.backend.new_cache(len(e)), last_only=False)
        np.testing.assert_allclose(reference.logits(h).numpy(), want, atol=1e-4 * np.abs(want).max(), rtol=0)
    assert len(held) == 2 * len(layers) and max(held) == len(list(layers[0].parameters()))


@pytest.mark.parametrize("decoder", ["int4", "int8"])
def test_answers_equal_is_what_both_bundles_answer(float_bundle, quantised, decoder):
    """The reference reading a quantised answer decides, as the float bundle answering would,
    whether the two answers are the same."""
    f, samples, reference = m4.load(float_bundle), load_samples("demo", 6), Reference(float_bundle)
    prompts = embed_samples(f, samples)[0]
    for q in (m4.load(quantised(decoder)), f):
        answers = answer(q, samples)
        hidden = reference.hidden([np.concatenate([e, f.backend.embed_tokens(a)]) for e, a in zip(prompts, answers)])
        direct = np.mean([a == b for a, b in zip(answers, answer(f, samples))])
        assert answers_equal(reference, hidden, prompts, answers, q.stop_ids) == direct
    assert direct == 1


def test_latency_is_left_out_where_both_bundles_do_not_fit(float_bundle, tmp_path, monkeypatch):
    """The float bundle is loaded whole only to time it beside the quantised one: where the two
    do not fit, the report says so and measures the rest."""
    arch = manifest_arch(read_manifest(float_bundle))
    monkeypatch.setenv("M4_MEMORY_LIMIT", str(needs(arch, "run", "int4") + 1))
    d = calibrate(float_bundle, tmp_path / "q", "demo", vision="none", decoder="int4", samples=2)["decoder"]
    assert d["latency"].startswith("not measured: both bundles side by side need") and "decode_tok_s" not in d
    assert d["positions"] > 0 and d["cosine"] > 0.8


def test_smoothing_alone_keeps_the_decoder_function(float_bundle, tmp_path):
    """SmoothQuant scaling moves magnitude between activations and weights: unquantised,
    the smoothed graph computes what the float graph computes."""
    ref = m4.load(float_bundle)
    a = ref.arch.text
    prompts = [ref.embed(*ref.prepare(QUESTIONS[2], random_images(2, seed=s), None, None, False)) for s in (1, 2)]
    feeds = prefill_feeds(prompts, a.layers, a.kv_heads, a.head_dim)
    model = onnx.load(float_bundle / "decoder.onnx")
    names = sorted({n.input[0] for n in weight_matmuls(model)})
    absmax = input_absmax(model, names, feeds, tmp_path / "absmax.onnx")
    assert smooth(model, absmax) == len(names)
    onnx.save(model, tmp_path / "smoothed.onnx")
    import onnxruntime as ort

    s, f = (ort.InferenceSession(str(x), providers=["CPUExecutionProvider"])
            for x in (tmp_path / "smoothed.onnx", float_bundle / "decoder.onnx"))
    ours, want = s.run(None, feeds[0])[0], f.run(None, feeds[0])[0]
    np.testing.assert_allclose(ours, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_w8a8_decoder_is_qdq_and_close(float_bundle, quantised):
    out = quantised("w8a8")
    g = onnx.load(out / "decoder.onnx").graph
    made_by = producer(g)
    linear = [n for n in g.node if n.op_type == "MatMul" and made_by.get(n.input[1]) is not None
              and made_by[n.input[1]].op_type == "DequantizeLinear"]
    assert len(linear) == len(weight_matmuls(onnx.load(float_bundle / "decoder.onnx")))
    assert all(made_by[n.input[0]].op_type == "DequantizeLinear" for n in linear)
    d = json.loads((out / "report.json").read_text())["decoder"]
    assert d["cosine"] > 0.95 and d["token_agreement"] >= 0.5 and d["graph"] == "decoder.onnx"
    # no fused twin: a float one would run on the CPU instead of the Q/DQ decoder
    m = json.loads((out / "m4.json").read_text())
    assert not list(out.glob(ORT_DECODER + "*")) and ORT_DECODER not in m["files"] and ORT_DECODER not in m["dtypes"]
    model = m4.load(out)
    assert not model.backend.fused
    assert isinstance(model.ask("Describe <image>.", images=random_images(1), max_new_tokens=4), str)


def test_calibration_sources(tmp_path):
    """A folder (images, a video, a broken file) and an M4-Instruct JSON give samples."""
    for i, img in enumerate(random_images(3, seed=5)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    write_video(tmp_path / "clip.mp4", (DemoScene().frame(i) for i in range(12)), fps=4)
    got = load_samples(str(tmp_path), 10)
    assert sorted(len(s.images) for s in got) == [1, 2, 4] and sum(s.video for s in got) == 1
    records = [{"id": "a", "image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Same."}]},
        {"id": "b", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "<image>\nWhat moves?"}, {"from": "gpt", "value": "A shape."}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    got = load_samples(str(tmp_path / "data.json"), 10)
    assert [len(s.images) for s in got] == [2, 4] and got[1].video and "<image>" not in got[1].text


def junk_folder(p):
    (p / "junk").mkdir()
    (p / "junk" / "a.jpg").write_bytes(b"\x00" * 64)
    (p / "junk" / "b.mp4").write_bytes(b"\x00" * 64)
    return p / "junk"


def text_only_json(p):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"Count to {i}."},
                                                 {"from": "gpt", "value": "1 2 3"}]} for i in range(4)]
    (p / "text.json").write_text(json.dumps(records))
    return p / "text.json"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "calibration data not found"), (junk_folder, "no decodable image or video"),
    (text_only_json, ".* has no images or video frames to calibrate the vision graph on")])
def test_bad_calibration_data_is_one_clear_line(float_bundle, tmp_path, make, message):
    src = make(tmp_path)
    with pytest.raises(M4Error, match=message):
        calibrate(float_bundle, tmp_path / "out", str(src))
    r = subprocess.run([sys.executable, "-m", "m4", "calibrate", float_bundle, tmp_path / "out", "--data", src],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and re.match(f"m4: error: {message}", r.stderr) and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_task_accuracy_of_both_bundles_on_a_bench(float_bundle, tmp_path):
    synth(tmp_path / "synth", n=0, bench=10, seed=1, size=32)
    bench = tmp_path / "synth" / "bench.json"
    out = tmp_path / "q"
    report = calibrate(float_bundle, out, "demo", vision="int8", decoder="int8", samples=4, bench=bench)
    a = report["task_accuracy"]
    assert a == json.loads((out / "report.json").read_text())["task_accuracy"]
    # the same scores m4 eval gives each bundle
    for name, bundle in (("float", float_bundle), ("quantised", out)):
        e = evaluate(str(bundle), bench)
        assert a[name]["n"] == 10 and a[name]["overall"] == e["overall"] and a[name]["by_task"] == e["by_task"]
    assert a["delta_points"] == pytest.approx(100 * (a["quantised"]["overall"] - a["float"]["overall"]))
    # a missing bench is one line, before any work
    r = subprocess.run([sys.executable, "-m", "m4", "calibrate", float_bundle, tmp_path / "q2", "--data", "demo",
                        "--bench", tmp_path / "nope.json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("m4: error: bench not found") and r.stderr.count("\n") == 1
    assert not (tmp_path / "q2").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_without_tensorrt_is_one_line(float_bundle):
    r = subprocess.run([sys.executable, "-m", "m4", "build", float_bundle], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("m4: error: m4 build needs TensorRT") and "not installed" in r.stderr
    assert not (float_bundle / "engines").exists()


def test_build_refuses_weight_only_decoders(quantised):
    from m4.export.engines import build

    with pytest.raises(M4Error, match="MatMulNBits"):
        build(quantised("int4"))


def test_engine_profiles_fit_the_graphs(float_bundle):
    """Every dynamic input of each graph has min <= opt <= max shapes in every profile, the
    static dimensions as the graph has them, and the graph runs at each profile's min and
    max (ONNX Runtime standing in for TensorRT, which is not here)."""
    import onnxruntime as ort

    from m4.export.engines import profiles

    m = json.loads((float_bundle / "m4.json").read_text())
    for name, shapes in profiles(m, max_images=3, max_context=40).items():
        graph = onnx.load(float_bundle / name, load_external_data=False).graph
        session = ort.InferenceSession(str(float_bundle / name), providers=["CPUExecutionProvider"])
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        for p in shapes:
            assert set(p) == {k for k, d in dims.items() if any(isinstance(x, str) for x in d)}
            for k, (lo, opt, hi) in p.items():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
                assert all(x == lo[i] == hi[i] for i, x in enumerate(dims[k]) if isinstance(x, int))
            for pick in (0, 2):
                feed = {k: np.zeros(v[pick], np.int64 if k in ("logits_index", "past_len") else np.float32)
                        for k, v in p.items()}
                assert session.run(None, feed)[0].shape[0] >= 1


def cuda_tensorrt() -> str | None:
    """Why TensorRT engines cannot be built here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    import tensorrt as trt

    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as e:
        return f"no CUDA GPU for TensorRT ({e})"
    return None


@pytest.mark.skipif(cuda_tensorrt() is not None, reason=str(cuda_tensorrt()))
@pytest.mark.parametrize("kind", ["float", "w8a8"])
def test_build_engines(float_bundle, quantised, tmp_path, kind):
    import shutil

    import tensorrt as trt

    from m4.export.engines import build

    bundle = shutil.copytree(float_bundle if kind == "float" else quantised("w8a8"), tmp_path / kind)
    record = build(bundle, max_images=4, max_context=256)
    m = json.loads((bundle / "m4.json").read_text())
    assert m["engines"]["tensorrt"] == trt.__version__ and m["engines"]["gpu"] == record["gpu"]
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine((bundle / "engines/decoder.plan").read_bytes())
    assert engine.num_optimization_profiles == 2
    assert m4.load(bundle).backend.manifest["files"]["engines/vision.plan"]["bytes"] > 0


def test_int8_vision_of_the_demo_preset_close_to_float(tmp_path):
    """The demo preset's tower (96-px images, 32-px patches) on M4-Synth's flat mid-grey: the
    case that put the patch embedding in float (m4/calib/vision.py)."""
    random_checkpoint("demo", tmp_path / "ck")
    export_bundle(str(tmp_path / "ck"), tmp_path / "float")
    calibrate(tmp_path / "float", tmp_path / "int8", "demo", vision="int8", decoder="none", samples=8)
    _, _, cos = held_out_embeddings(m4.load(tmp_path / "float"), m4.load(tmp_path / "int8"))
    assert cos.min() >= 0.99, cos.min()


@pytest.mark.parametrize("decoder, agreement", [("int8", 0.6), ("int4", 0.1)])
def test_llama_clip_bundle_quantises(checkpoints, bundles, oracle, tmp_path, decoder, agreement):
    """A Mantis-shaped checkpoint (CLIP tower, Llama decoder): INT8 vision stays close to
    float (cosine >= 0.99 on held-out frames); the quantised decoder loads, answers, and
    predicts transformers' answer tokens teacher-forced (bounds measured with margin: 1.0
    and 0.17 on this tiny wide-init checkpoint, the hard case for INT4; chance is 1/384)."""
    variant = "llama-clip-mha-tied-penult-default"
    calibrate(bundles[variant], tmp_path / "q", "demo", vision="int8", decoder=decoder, samples=8)
    ref, q = m4.load(bundles[variant]), m4.load(tmp_path / "q")
    assert q.arch.vision.kind == "clip" and q.arch.text.kind == "llama"
    _, _, cos = held_out_embeddings(ref, q)
    assert cos.min() >= 0.99, cos.min()
    images = random_images(2, seed=31)
    assert len(list(q.tokens(QUESTIONS[2], images=images, max_new_tokens=8))) == 8
    p, pictures = q.prepare(QUESTIONS[2], images)
    want = oracle_tokens(oracle(checkpoints[variant]), q, p, pictures, 12)
    logits = teacher_forced(q.backend, q.embed(p, pictures), want)
    assert (logits.argmax(-1) == want).mean() >= agreement


@pytest.mark.parametrize("decoder", ["int4", "int8"])
def test_export_writes_the_deployed_precision_directly(checkpoints, float_bundle, quantised, tmp_path, decoder):
    """`m4 export --dtype int4` quantises each weight as it is written, with no float bundle
    in between: its decoder is the one calibrate makes from the fp32 bundle (logits equal),
    and its two decoder graphs read one copy of the quantised weights."""
    out = tmp_path / decoder
    m = export_bundle(str(checkpoints[VARIANT]), out, decoder)
    assert m["dtype"] == "fp32" and m["quantisation"][ORT_DECODER]["scheme"] == f"{decoder}-weight-only"
    direct, calibrated = m4.load(out), m4.load(quantised(decoder))
    embeds = np.random.default_rng(3).normal(0, 1, (7, direct.arch.text.hidden)).astype(np.float32)
    logits = [b.backend.forward(embeds, 0, b.backend.new_cache(8), last_only=False) for b in (direct, calibrated)]
    np.testing.assert_array_equal(*logits)
    nbits = {g: [n.input[1] for n in onnx.load(str(out / g), load_external_data=False).graph.node
                 if n.op_type == "MatMulNBits"] for g in ("decoder.onnx", ORT_DECODER)}
    where = {g: places(out / g) for g in nbits}
    assert len(nbits["decoder.onnx"]) == len(nbits[ORT_DECODER]) > 0
    assert {where["decoder.onnx"][b] for b in nbits["decoder.onnx"]} == {where[ORT_DECODER][b] for b in nbits[ORT_DECODER]}
    assert {f for p in where.values() for f, _ in p.values()} == {DECODER_WEIGHTS}
    assert not list(out.glob("*.data"))
