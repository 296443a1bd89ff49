"""The vision graph (pixels -> projected embeddings) as static INT8 with explicit Q/DQ.

Weights are symmetric per-channel INT8, activations symmetric per-tensor INT8 with ranges
from calibration: the form ONNX Runtime runs as integer kernels on the CPU and TensorRT
builds (explicit quantisation, zero points 0). Only the MatMuls are quantised: layer norms,
softmax and GELU stay float, where INT8 costs accuracy and buys no speed, and so does the
patch embedding (a Conv), which reads the pixels themselves: 8-bit pixels normalised to
[-1, 1] lie at odd multiples of 1/255, and symmetric INT8 levels are 1/127 apart, so near the
middle a pixel falls half-way between two levels (mid-grey, 1/255, between 0 and 1/127) and a
flat background rounds the same way everywhere. On M4-Synth's mid-grey that moved every empty
patch's token (held-out cosine 0.85-0.97 at worst on random demo-preset towers, 0.995 with the
Conv float). It is 0.2% of SigLIP-so400m's work.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
OPS = ("MatMul",)  # benchmarks/quant.py measures the alternatives
# Symmetric activations (zero point 0) are what TensorRT's explicit INT8 takes, and float
# biases: its DequantizeLinear takes INT8 weights but not ORT's INT32 biases. ORT's
# calibrators keep every calibrated tensor of every run they are given until they reduce
# them (memory: runs x activations, 30 GB for SigLIP-so400m on 8 images); a stride of one
# run makes ORT reduce and merge the ranges run by run.
EXTRA = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False, "CalibStridedMinMax": 1}


@contextmanager
def quiet():
    """ORT's quantisation logs advice and per-node notes on the root logger: not for the user."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class Feeds(CalibrationDataReader):
    """Calibration inputs, one dict per run. ORT's entropy and percentile collectors stack
    each tensor's values over runs and fail on mixed shapes, so callers give runs of one
    shape. `set_range` lets ORT calibrate run by run (see EXTRA)."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.set_range(0, len(feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next = iter(self.feeds[start_index:end_index])

    def get_next(self) -> dict | None:
        return next(self.next, None)


def pixel_runs(pixels: np.ndarray) -> list[dict]:
    """One image per calibration run: every run the same shape, and the least memory."""
    return [{"pixel_values": pixels[i:i + 1]} for i in range(len(pixels))]


def quantize_vision(src: Path, dst: Path, pixels: np.ndarray, method: str,
                    exclude: list[str] | None = None, ops: tuple[str, ...] = OPS) -> dict:
    """Write the INT8 Q/DQ form of `src` to `dst`, calibrated on `pixels`; its record."""
    with quiet():
        quantize_static(
            str(src), str(dst), Feeds(pixel_runs(pixels)), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(ops), nodes_to_exclude=exclude or [], per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=METHODS[method],
            extra_options=EXTRA)
    return {"scheme": "int8-qdq", "weights": "int8 symmetric per-channel", "activations": "int8 symmetric per-tensor",
            "quantised_ops": list(ops), "float_nodes": exclude or [], "method": method,
            "calibration_images": len(pixels)}
