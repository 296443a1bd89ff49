"""Projections of one input fused into one Linear: q, k and v; gate and up.

A decode step at batch 1 on a GPU is bound by how many kernels it launches, not by the
bytes it reads (docs/performance.md, GPU), and one matmul is one launch where three were.
Checkpoints keep the projections apart; `parts` names them as the checkpoint does, with
their output sizes, so loading concatenates them and saving splits them again.
"""

from collections.abc import Iterator

import torch
from torch import nn



class FusedLinear(nn.Linear):
    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts


def fused(model: nn.Module) -> Iterator[tuple[str, str, str, FusedLinear]]:
    """(the parent module's name, the fused tensor's name, "weight" or "bias", the module)
    for every fused tensor of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, FusedLinear):
            prefix = name.rsplit(".", 1)[0]
            for kind in ("weight", "bias") if module.bias is not None else ("weight",):
                yield prefix, f"{name}.{kind}", kind, module


def split_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The model's fused tensors -> the checkpoint's separate ones, in place."""
    for prefix, key, kind, module in fused(model):
        for part, t in zip(module.parts, torch.split(state.pop(key), list(module.parts.values()))):
            state[f"{prefix}.{part}.{kind}"] = t
