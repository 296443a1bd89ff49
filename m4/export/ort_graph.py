"""`decoder_ort.onnx`: the decoder for ONNX Runtime on the CPU, written with its fused
contrib ops (com.microsoft) straight from the weights.

decoder.onnx (graphs.py) is standard ONNX so that TensorRT builds it; ONNX Runtime runs it
as ~40 small nodes a layer, and at one token a step their dispatch is a good part of the
time. This graph is what onnxruntime-genai's model builder makes for Qwen2, with m4's
interface: per layer SkipSimplifiedLayerNormalization, one q/k/v MatMul, GroupQueryAttention
(rotary inside, the cache read and written in place: past and present are one buffer that
the runtime owns and binds to both), o_proj, one gate/up MatMul, the activation, down_proj.

Inputs: `inputs_embeds` (B, T, H): B contexts, T new tokens each; `past_len` (B,): row b's
tokens take positions [past_len[b], past_len[b] + T), which are also their cache rows (RoPE
angle = cache row, as in decoder.onnx; approximate eviction keeps it so by re-rotating keys
as it moves them); `logits_index` (K,); per layer `past_key.i` and `past_value.i`,
(B, kv, M, D): one cache per row, laid out one after another (a page of the runtime's pool).
Outputs: `logits` (B, K, vocab) and per layer `present_key.i`, `present_value.i`: the same
buffers, with each row's new positions written.
"""

from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from m4.bundle_format import past_names, present_names
from m4.errors import M4Error
from m4.export.tensors import NUMPY, Tensors
from m4.export.weights import Weights, matmul_nbits, quantised_linear
from m4.model.config import TextArch
from m4.model.decoder import Decoder, Layer
from m4.model.rope import rope_table

MS = "com.microsoft"
OPSET = 18
# the MLP's activation as one contrib op: silu is x * sigmoid(1.0 * x)
ACT: dict[str, tuple[str, dict[str, Any]]] = {
    "silu": ("QuickGelu", {"alpha": 1.0}), "quick_gelu": ("QuickGelu", {"alpha": 1.702}),
    "gelu": ("Gelu", {}), "gelu_pytorch_tanh": ("FastGelu", {}), "gelu_new": ("FastGelu", {})}
ELEM = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def runs_on_ort(arch: TextArch) -> bool:
    """Whether ONNX Runtime's CPU GroupQueryAttention takes this decoder: its rotary kernel
    wants head sizes that are multiples of 16 (it refuses 8, 12, 24, 40 at the first run).
    Bundles of other decoders carry decoder.onnx alone, which the CPU runs as well."""
    return arch.head_dim % 16 == 0


class Builder:
    """Nodes and initializers, named in order. Model tensors come from the bundle's weights
    file under the keys decoder.onnx uses (trace.attach), so the two graphs share them."""

    def __init__(self, weights: Weights, tensors: Tensors, bits: int | None):
        self.weights, self.tensors, self.bits = weights, tensors, bits
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.quantised = 0

    def param(self, name: str) -> str:
        self.initializers.append(self.weights.tensor(name, name, partial(self.tensors, name)))
        return name

    def const(self, name: str, a: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(a, name))
        return name

    def op(self, op: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        outs = [f"{name}/out{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def linear(self, x: str, lin: torch.nn.Linear, name: str) -> str:
        """x @ W^T (+ the bias): one MatMul over W stored transposed, or with `bits` one
        MatMulNBits over W quantised. `name`: the Linear's name in the model."""
        w, out = f"{name}.weight", f"{name}/out0"
        if self.bits:
            n, k = lin.weight.shape
            b, s = quantised_linear(self.weights, w, partial(self.tensors.float_rows, w), n, k, self.bits)
            self.initializers += [b, s]
            self.nodes.append(matmul_nbits(x, b, s, out, name, n, k, self.bits))
            self.quantised += 1
            y = out
        else:
            wt = self.weights.tensor(f"{w}.T", f"{w}.T", partial(self.tensors.transposed, w))
            self.initializers.append(wt)
            (y,) = self.op("MatMul", [x, wt.name], name)
        if lin.bias is not None:
            (y,) = self.op("Add", [y, self.param(f"{name}.bias")], f"{name}/bias")
        return y


def decoder_graph(text: Decoder, arch: TextArch, dtype: torch.dtype, g: Builder) -> onnx.ModelProto:
    """The graph over `text`'s structure (its tensors may be on the meta device)."""
    layers = cast(list[Layer], list(text.layers))
    a = layers[0].self_attn
    if arch.act not in ACT:
        raise M4Error(f"activation {arch.act!r} has no ONNX Runtime contrib op here")
    d = a.head_dim
    # GroupQueryAttention's lengths, int32: per row seqlens_k = past_len + T - 1 (B,), and the
    # longest row's total (a scalar)
    (shape,) = g.op("Shape", ["inputs_embeds"], "tokens", start=1, end=2)
    (total,) = g.op("Add", ["past_len", shape], "total")
    (last,) = g.op("Sub", [total, g.const("one", np.array([1], np.int64))], "last")
    (seqlens,) = g.op("Cast", [last], "seqlens_k", to=TensorProto.INT32)
    (longest,) = g.op("ReduceMax", [total], "longest", keepdims=0)
    (total_len,) = g.op("Cast", [longest], "total_sequence_length", to=TensorProto.INT32)
    cos, sin = (g.const(n, t[:, :d // 2].astype(NUMPY[dtype])) for n, t in zip(("cos_cache", "sin_cache"), rope_table(arch)))

    x, residual = "inputs_embeds", None
    for i, layer in enumerate(layers):
        at, mlp = layer.self_attn, layer.mlp
        p = f"text.layers.{i}"
        h, residual = norm(g, x, residual, layer.input_layernorm, f"{p}.input_layernorm")
        qkv = g.linear(h, at.qkv_proj, f"{p}.self_attn.qkv_proj")
        y, _, _ = g.op("GroupQueryAttention", [qkv, "", "", f"past_key.{i}", f"past_value.{i}", seqlens, total_len,
                                               cos, sin], f"layers.{i}.attn", outputs=3, domain=MS,
                       num_heads=at.heads, kv_num_heads=at.kv_heads, scale=1.0, do_rotary=1)
        g.nodes[-1].output[1:] = [f"present_key.{i}", f"present_value.{i}"]
        x = g.linear(y, at.o_proj, f"{p}.self_attn.o_proj")
        h, residual = norm(g, x, residual, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
        gate, up = g.op("Split", [g.linear(h, mlp.gate_up_proj, f"{p}.mlp.gate_up_proj")],
                        f"layers.{i}.split", outputs=2, axis=-1, num_outputs=2)
        op, attrs = ACT[arch.act]
        (act,) = g.op(op, [gate], f"layers.{i}.act", domain=MS, **attrs)
        (prod,) = g.op("Mul", [act, up], f"layers.{i}.mul")
        x = g.linear(prod, mlp.down_proj, f"{p}.mlp.down_proj")
    assert residual is not None  # the first layer's norm made one
    (x,) = g.op("Add", [x, residual], "residual")
    (x,) = g.op("Gather", [x, "logits_index"], "keep", axis=1)
    h, _ = norm(g, x, None, text.norm, "text.norm")
    g.linear(h, text.lm_head, "text.lm_head")
    g.nodes[-1].output[0] = "logits"  # the lm_head has no bias: its MatMul is the last node

    elem, kv = ELEM[dtype], a.kv_heads
    cache = [helper.make_tensor_value_info(n, elem, ["batch", kv, "cache", d]) for n in past_names(len(text.layers))]
    inputs = [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "tokens", arch.hidden]),
              helper.make_tensor_value_info("past_len", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["keep"])] + cache
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch", "keep", arch.vocab])] + [
        helper.make_tensor_value_info(n, elem, ["batch", kv, "cache", d]) for n in present_names(len(text.layers))]
    graph = helper.make_graph(g.nodes, "m4_decoder_ort", inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])


def norm(g: Builder, x: str, residual: str | None, n, name: str) -> tuple[str, str]:
    """RMSNorm of x + residual -> (normed, the sum: the next residual); the first layer's
    input has no residual yet."""
    w = g.param(f"{name}.weight")
    if residual is None:
        (y,) = g.op("SimplifiedLayerNormalization", [x, w], name, epsilon=n.eps, axis=-1, stash_type=1)
        return y, x
    y, _, _, s = g.op("SkipSimplifiedLayerNormalization", [x, residual, w], name, outputs=4, domain=MS, epsilon=n.eps)
    return y, s


def export_ort_decoder(text: Decoder, arch: TextArch, f: Path, dtype: torch.dtype, weights: Weights,
                       tensors: Tensors, bits: int | None) -> int:
    """Write decoder_ort.onnx (its weights into `weights`); how many linears it quantised."""
    g = Builder(weights, tensors, bits)
    onnx.save(decoder_graph(text, arch, dtype, g), f)
    return g.quantised
