"""A bundle's graph weights, written one tensor at a time into a file that the graphs read as
external data.

Export never holds the model: each tensor is read from the checkpoint (memory-mapped),
transformed (cast, transposed for a MatMul, the query scale folded in, quantised) and
appended here, then dropped. Graphs refer to a tensor by its key: decoder.onnx and
decoder_ort.onnx ask for the same keys, so a bundle stores the decoder's weights once and
both graphs read that one file.

Weight-only quantisation is ONNX Runtime's MatMulNBits: block-wise symmetric INT4 or INT8
weights (blocks of 32 along the input dimension, one float scale each), quantised by
onnxruntime's own kernel, a slice of output rows at a time so that no float32 copy of a
whole large matrix (the head of a 150k vocabulary) is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

ALIGN = 4096  # each tensor starts on a page, so a runtime can map it in place
BLOCK = 32  # weights per scale: ORT's accurate default for 4-bit LLM weights
ROWS = 4096  # output rows quantised at a time
# accuracy level 4: the kernels quantise activations to int8 per block and run integer dot
# products; measured here (AVX512-VNNI) 8x faster decode for int8 weights than level 0's float path
ACCURACY_LEVEL = 4
BITS = {"int4": 4, "int8": 8}


class Weights:
    """An append-only external-data file. `tensor(name, key, make)` returns an initializer
    named `name` that points at the bytes of `key`, computing them with make() only the
    first time a key is asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.stored: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}

    def close(self) -> None:
        self.file.close()

    def tensor(self, name: str, key: str, make: Callable[[], np.ndarray]) -> TensorProto:
        if key not in self.stored:
            self.append(key, make())
        return self.ref(name, key)

    def ref(self, name: str, key: str) -> TensorProto:
        """An initializer named `name` over the stored tensor `key`."""
        offset, length, elem, shape = self.stored[key]
        t = TensorProto(name=name, data_type=elem, dims=shape, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        return t

    def append(self, key: str, a: np.ndarray) -> None:
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        a = np.ascontiguousarray(a)
        self.file.write(a.reshape(-1).view(np.uint8).data)
        self.stored[key] = (offset, a.nbytes, helper.np_dtype_to_tensor_dtype(a.dtype), tuple(a.shape))

    def append_rows(self, key: str, shape: tuple[int, ...], dtype: type[np.generic],
                    pieces: Iterator[np.ndarray]) -> None:
        """A tensor written as the row slices `pieces` yields, in order."""
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        for p in pieces:
            self.file.write(np.ascontiguousarray(p, dtype).reshape(-1).view(np.uint8).data)
        length = self.file.tell() - offset
        self.stored[key] = (offset, length, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def quantiser(bits: int) -> DefaultWeightOnlyQuantizer:
    return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=BLOCK, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits))


def quantised_linear(weights: Weights, key: str, rows: Callable[[int, int], np.ndarray], n: int, k: int,
                     bits: int, scale_dtype: type = np.float32) -> tuple[TensorProto, TensorProto]:
    """MatMulNBits' B and scales for the weight W (n outputs, k inputs) whose rows [i, j)
    rows(i, j) returns as float32: quantised ROWS output rows at a time. The scales take the
    graph's float dtype, as MatMulNBits wants."""
    blocks = (k + BLOCK - 1) // BLOCK
    blob = BLOCK * bits // 8
    if f"{key}.q{bits}" not in weights.stored:
        q = quantiser(bits)
        scales: list[np.ndarray] = []

        def packed() -> Iterator[np.ndarray]:
            for i in range(0, n, ROWS):
                p, s, _ = q.qbits_block_quant(np.ascontiguousarray(rows(i, min(i + ROWS, n)).T))
                scales.append(s)
                yield p

        weights.append_rows(f"{key}.q{bits}", (n, blocks, blob), np.uint8, packed())
        weights.append(f"{key}.q{bits}.scales", np.concatenate(scales).astype(scale_dtype))
    return weights.ref(f"{key}.q{bits}", f"{key}.q{bits}"), weights.ref(f"{key}.q{bits}.scales", f"{key}.q{bits}.scales")


def matmul_nbits(x: str, b: TensorProto, scales: TensorProto, out: str, name: str, n: int, k: int,
                 bits: int) -> onnx.NodeProto:
    return helper.make_node("MatMulNBits", [x, b.name, scales.name], [out], name=name, domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)


def quantisation_record(bits: int, nodes: int) -> dict:
    """What m4.json says of a weight-only quantised decoder graph."""
    return {"scheme": f"int{bits}-weight-only", "op": "com.microsoft.MatMulNBits",
            "weights": f"int{bits} symmetric, blocks of {BLOCK}",
            "activations": "float in, int8 per block inside (accuracy_level 4)", "quantised_nodes": nodes}
