"""The vision graph (pixels -> projected embeddings) as static INT8 with explicit Q/DQ.

Weights are symmetric per-channel INT8, activations symmetric per-tensor INT8 with ranges
from calibration: the form ONNX Runtime runs as integer kernels on the CPU and TensorRT
builds (explicit quantisation, zero points 0). Only the linear ops (MatMul, Conv) are
quantised: layer norms, softmax and GELU stay float, where INT8 costs accuracy and buys no
speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
BATCH = 4  # images per calibration run; every run the same shape (see Feeds)
OPS = ("MatMul", "Conv")  # benchmarks/quant.py measures the alternatives


class Feeds(CalibrationDataReader):
    """Calibration inputs, one dict per run. ORT's entropy and percentile collectors stack
    each tensor's values over runs and fail on mixed shapes, so callers give runs of one
    shape."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def pixel_batches(pixels: np.ndarray, batch: int = BATCH) -> list[dict]:
    """(n, 3, S, S) -> runs of `batch` images; the last is filled up from the first images."""
    n = len(pixels)
    runs = -(-n // batch)
    order = np.arange(runs * batch) % n
    return [{"pixel_values": pixels[order[i * batch:(i + 1) * batch]]} for i in range(runs)]


def quantize_vision(src: Path, dst: Path, pixels: np.ndarray, method: str,
                    exclude: list[str] | None = None, ops: tuple[str, ...] = OPS) -> dict:
    """Write the INT8 Q/DQ form of `src` to `dst`, calibrated on `pixels`; its record."""
    quantize_static(
        str(src), str(dst), Feeds(pixel_batches(pixels)), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(ops), nodes_to_exclude=exclude or [], per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=METHODS[method],
        # symmetric activations (zero point 0) are what TensorRT's explicit INT8 takes
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return {"scheme": "int8-qdq", "weights": "int8 symmetric per-channel", "activations": "int8 symmetric per-tensor",
            "quantised_ops": list(ops), "float_nodes": exclude or [], "method": method,
            "calibration_images": len(pixels)}
