"""The model's tensors as a bundle stores them, read one at a time from the checkpoint: in
the export's float dtype, with softmax's query scale folded into the qkv projections
(graphs.query_scale), and the non-persistent buffers (RoPE tables) from their own values."""

from __future__ import annotations

import numpy as np
import torch

from m4.export.graphs import query_scale
from m4.model.checkpoint import Checkpoint

NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


class Tensors:
    def __init__(self, source: Checkpoint, dtype: torch.dtype):
        self.source, self.dtype = source, dtype
        text = source.model.text
        self.buffers = {f"text.{n}": b for n, b in text.named_buffers()}  # computed at construction, not meta
        scale = query_scale(text)
        self.scales = {f"text.layers.{i}.self_attn.qkv_proj.{kind}": scale
                       for i in range(len(text.layers)) for kind in ("weight", "bias")}

    @staticmethod
    def model_name(name: str) -> str:
        return name.removeprefix("model.")  # the vision graph holds the model as `model`

    def shape(self, name: str) -> tuple[int, ...]:
        name = self.model_name(name)
        return tuple(self.buffers[name].shape) if name in self.buffers else self.source.model_shape(name)

    def __call__(self, name: str, rows: slice = slice(None), dtype: type | None = None) -> np.ndarray:
        """The tensor (or its output rows `rows`) as numpy, in `dtype` or the export's."""
        name = self.model_name(name)
        t = self.buffers[name][rows] if name in self.buffers else self.source.tensor(name, rows=rows)
        if name in self.scales:
            t = t.float() * self.scales[name][rows].reshape(-1, *[1] * (t.dim() - 1))
        return t.to(self.dtype).numpy().astype(dtype or NUMPY[self.dtype], copy=False)

    def float_rows(self, name: str, i: int, j: int) -> np.ndarray:
        """Output rows [i, j) in float32, for quantising."""
        return self(name, rows=slice(i, j), dtype=np.float32)

    def transposed(self, name: str) -> np.ndarray:
        """(inputs, outputs): a linear's weight as a MatMul's second operand."""
        return self(name).T
