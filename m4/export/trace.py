"""Graphs traced from the model's structure alone, weights attached one at a time.

The model is traced on the meta device (shapes, no data) with torch.onnx's dynamo exporter
at opset 18: standard ops only, which ONNX Runtime runs and TensorRT builds. The ONNX
optimiser then runs with the weights left unknown, so it simplifies the graph without
folding any weight; the one fold that matters, a weight's transpose feeding a MatMul, is done
here by storing the weight transposed. Each weight is then read, transformed and written to
the bundle's weights file (weights.py) before the next: a 14B decoder is traced and written
in the memory of its largest tensor.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from functools import partial

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch

from m4.export.tensors import Tensors
from m4.export.weights import Weights, matmul_nbits, quantised_linear

OPSET = 18  # TensorRT 10 parses it whole; 23's Attention and RMSNormalization it may not



def trace(module: torch.nn.Module, args: tuple, names: list[str], outputs: list[str],
          dynamic: tuple) -> tuple[onnx.ModelProto, list[str]]:
    """The graph of `module` (on the meta device) without its weights, and the weights' names."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not ours to fix
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # chatter about each node, and deduplication of
            logging.getLogger(name).setLevel(logging.ERROR)  # the weights that are left out on purpose
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET, input_names=names,
                                    output_names=outputs, dynamic_shapes=dynamic, verbose=False, optimize=False)
    assert program is not None  # dynamo=True returns the program
    model = program.model
    weights = []
    for name, value in model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.is_meta:
            value.const_value = None  # unknown to the optimiser: nothing of it is folded
            weights.append(name)
    onnxscript.optimizer.optimize_ir(model)
    kept = [n for n in weights if n in model.graph.initializers]
    for n in kept:
        model.graph.initializers.pop(n)
    return ir.serde.serialize_model(model), kept


def attach(model: onnx.ModelProto, names: list[str], weights: Weights, tensors: Tensors,
           bits: int | None = None) -> int:
    """Give a traced graph its weights from `tensors` (names as the traced module's), in place.
    A weight transposed into MatMuls is stored transposed (key `name.T`), or with `bits` those
    MatMuls become MatMulNBits over the quantised weight. Returns how many were quantised."""
    g = model.graph
    readers = defaultdict(list)
    for node in g.node:
        for i in node.input:
            readers[i].append(node)
    wanted, quantised, dropped = set(names), 0, []
    for node in g.node:
        if node.op_type != "Transpose" or node.input[0] not in wanted:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        users = readers[node.output[0]]
        if perm != [1, 0] or not all(u.op_type == "MatMul" and u.input[1] == node.output[0] for u in users):
            continue
        w = node.input[0]
        dropped.append(node)
        if bits:
            n, k = tensors.shape(w)
            b, s = quantised_linear(weights, w, partial(tensors.float_rows, w), n, k, bits)
            g.initializer.extend([b, s])
            for u in users:  # each MatMul replaced where it stands: the graph stays sorted
                u.CopyFrom(matmul_nbits(u.input[0], b, s, u.output[0], u.name, n, k, bits))
                quantised += 1
        else:  # named by its key, as decoder_ort.onnx names it: a reader finds a weight by name
            g.initializer.append(weights.tensor(f"{w}.T", f"{w}.T", partial(tensors.transposed, w)))
            for u in users:
                u.input[1] = f"{w}.T"
    for node in dropped:
        g.node.remove(node)
    read = {i for node in g.node for i in node.input}
    for w in names:
        if w in read:
            g.initializer.append(weights.tensor(w, w, partial(tensors, w)))
    return quantised
