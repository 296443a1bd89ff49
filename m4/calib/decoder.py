"""The decoder graph quantised: weight-only INT4/INT8, or W8A8 Q/DQ with SmoothQuant scaling.

Weight-only: each weight MatMul becomes ONNX Runtime's MatMulNBits (block-wise symmetric
INT4 or INT8 weights, float activations), the CPU path, quantised by onnxruntime's kernel a
slice at a time (m4/export/weights.py, as `m4 export --dtype int4` does), to decoder.onnx and
to the fused decoder_ort.onnx alike, which share the quantised weights.

W8A8 (for TensorRT): SmoothQuant (Xiao et al. 2023) moves activation outliers into the
weights, per input channel c of each weight MatMul, s_c = max|X_c|^a / max|W_c|^(1-a):
W <- diag(s) W and X <- X / s, the latter folded into the RMSNorm weight that produces X
where there is one, else an explicit Mul. Then weights are quantised INT8 symmetric
per-channel and the MatMul inputs INT8 symmetric per-tensor, calibrated, as explicit Q/DQ.
Attention's activation-by-activation matmuls and everything else stay float.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from m4.bundle_format import past_names
from m4.calib.vision import EXTRA, METHODS, Feeds, quiet
from m4.export.weights import Weights, matmul_nbits, quantisation_record, quantised_linear

ALPHA = 0.5  # SmoothQuant's migration strength for its OPT/Llama-style models
EXTERNAL = 1 << 30  # graphs with more weight bytes than this keep them in a .data file (protobuf stops at 2 GB)


def save(model: onnx.ModelProto, f: Path) -> None:
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    onnx.save(model, str(f), save_as_external_data=weights > EXTERNAL, location=f.name + ".data")


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls whose second input is a 2-D constant: the linear layers (not attention)."""
    dims = {i.name: len(i.dims) for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and dims.get(n.input[1]) == 2]


def weight_only(src: Path, dst: Path, weights: Weights, bits: int) -> dict:
    """A float bundle's decoder graph src -> dst with every weight MatMul a MatMulNBits. Each
    weight is read from src's external data where it lies (memory-mapped) and quantised a
    slice at a time into `weights`, the new bundle's decoder weights file, as export does;
    the graph's other tensors are copied there (both decoder graphs read one copy)."""
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    added = []
    for node in g.node:
        b = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if b is None or len(b.dims) != 2:
            continue
        w = mapped(src.parent, b)  # (K, N) = W^T
        k, n = w.shape
        q, s = quantised_linear(weights, stored_key(b), partial(columns, w), n, k, bits, w.dtype.type)
        node.CopyFrom(matmul_nbits(node.input[0], q, s, node.output[0], node.name, n, k, bits))
        added += [q, s]
    read = {x for node in g.node for x in node.input}
    kept = [t if not external(t) else weights.tensor(t.name, stored_key(t), partial(mapped, src.parent, t))
            for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept + added)
    onnx.save(model, str(dst))
    return quantisation_record(bits, len(added) // 2)


def columns(w: np.ndarray, i: int, j: int) -> np.ndarray:
    """Rows [i, j) of W, in float32, from a MatMul's (K, N) operand W^T."""
    return w[:, i:j].T.astype(np.float32)


def external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def place(t: onnx.TensorProto) -> dict[str, str]:
    """An external tensor's location, offset and length, as ONNX records them."""
    return {"offset": "0", **{e.key: e.value for e in t.external_data}}


def stored_key(t: onnx.TensorProto) -> str:
    """Where an external tensor's bytes lie: tensors of two graphs at one place are one tensor."""
    info = place(t)
    return f"{info['location']}@{info['offset']}"


def mapped(root: Path, t: onnx.TensorProto) -> np.ndarray:
    """An external tensor as a read-only memory map of its file (an inline one as an array)."""
    if not external(t):
        return numpy_helper.to_array(t)
    info = place(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.memmap(root / info["location"], dtype=dtype, mode="r", offset=int(info["offset"]),
                     shape=tuple(t.dims))


def prefill_feeds(prompts: list[np.ndarray], layers: int, kv_heads: int, head_dim: int) -> list[dict]:
    """Decoder inputs prefilling each prompt's embeddings (T, H) from position 0, all cut to
    the shortest prompt's length (same-shape runs, see Feeds). The cache is one masked
    position (past_len 0): the graph's cache dimension is never empty."""
    t = min(len(p) for p in prompts)
    past = {}
    for name in past_names(layers):
        shape = (1, kv_heads, head_dim, 1) if "key" in name else (1, kv_heads, 1, head_dim)
        past[name] = np.zeros(shape, np.float32)
    return [{"inputs_embeds": p[None, :t].astype(np.float32), "past_len": np.array([0], np.int64),
             "logits_index": np.array([t - 1], np.int64), **past} for p in prompts]


def input_absmax(model: onnx.ModelProto, names: list[str], feeds: list[dict], tmp: Path) -> dict[str, np.ndarray]:
    """Per-channel max |x| of the named tensors over the calibration runs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in names)
    save(m, tmp)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
    out: dict[str, np.ndarray] = {}
    for feed in feeds:
        for x, v in zip(names, s.run(names, feed)):
            a = np.abs(v).reshape(-1, v.shape[-1]).max(0)
            out[x] = np.maximum(out[x], a) if x in out else a
    return out


def smooth(model: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float = ALPHA) -> int:
    """SmoothQuant scaling of every weight MatMul's input, in place; how many inputs."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses, producer = defaultdict(list), {}
    for n in g.node:
        for i in n.input:
            uses[i].append(n)
        for o in n.output:
            producer[o] = n
    groups = defaultdict(list)  # an activation -> the weight MatMuls reading it (gate and up share one)
    for n in weight_matmuls(model):
        groups[n.input[0]].append(n)
    for x, mms in groups.items():
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in mms]
        wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)
        s = (np.maximum(absmax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
        for n, w in zip(mms, ws):
            name = f"{n.input[1]}_smoothed"  # a new tensor: the old one may have other readers
            g.initializer.append(numpy_helper.from_array(w * s[:, None], name))
            n.input[1] = name
        p = producer.get(x)
        scale = [i for i in (p.input if p is not None and p.op_type == "Mul" else [])
                 if i in inits and tuple(inits[i].dims) == s.shape and len(uses[i]) == 1]
        if scale and len(uses[x]) == len(mms):  # x = norm weight * ...: fold 1/s into the weight
            w = inits[scale[0]]
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) / s, w.name))
        else:
            g.initializer.append(numpy_helper.from_array(1 / s, f"{x}_smooth_scale"))
            mul = onnx.helper.make_node("Mul", [x, f"{x}_smooth_scale"], [f"{x}_smoothed"], name=f"{x}_smooth")
            g.node.insert(list(g.node).index(mms[0]), mul)  # before its first reader: the graph stays sorted
            for n in mms:
                n.input[0] = f"{x}_smoothed"
    return len(groups)


def w8a8(src: Path, dst: Path, feeds: list[dict], method: str, work: Path) -> dict:
    model = onnx.load(str(src))
    names = sorted({n.input[0] for n in weight_matmuls(model)})
    smoothed = smooth(model, input_absmax(model, names, feeds, work / "absmax.onnx"), ALPHA)
    drop_unused(model)
    save(model, work / "smoothed.onnx")
    nodes = [n.name for n in weight_matmuls(model)]
    with quiet():
        quantize_static(
            str(work / "smoothed.onnx"), str(dst), Feeds(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=METHODS[method],
            use_external_data_format=sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL,
            extra_options=EXTRA)
    return {"scheme": "w8a8-qdq", "smoothquant_alpha": ALPHA, "smoothed_inputs": smoothed,
            "weights": "int8 symmetric per-channel", "activations": "int8 symmetric per-tensor",
            "quantised_nodes": len(nodes), "method": method, "calibration_prompts": len(feeds),
            "calibration_tokens": int(feeds[0]["inputs_embeds"].shape[1])}


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads (the weights smoothing replaced)."""
    read = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
