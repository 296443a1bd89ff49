"""Weight-only INT8 for the decoder's linears: int8 weights with one symmetric scale per
output channel, activations stay float. Decoding one token reads every weight once, so
halving the bytes read is what speeds it up; the matrix product itself stays in float.
"""

import torch
import torch.nn.functional as F
from torch import nn

GEMV_ROWS = 16  # up to this many rows (decode) use the fused int8 kernel; prefill dequantises


class Int8Linear(nn.Module):
    weight: torch.Tensor  # buffers, registered below
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.fused = self._fused_works(linear.weight.dtype)

    def _fused_works(self, dtype: torch.dtype) -> bool:
        """Whether torch._weight_int8pack_mm runs on this device, dtype and shape (it is
        CPU-only in some torch builds and shape-limited in others)."""
        try:
            x = torch.zeros(1, self.weight.shape[1], dtype=dtype, device=self.weight.device)
            torch._weight_int8pack_mm(x, self.weight, self.scale)
            return True
        except (RuntimeError, NotImplementedError, AttributeError):
            return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1]
        if self.fused and rows.numel() <= GEMV_ROWS:
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale).view(*rows, -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def quantise_decoder(text: nn.Module) -> None:
    """Replace every linear of the decoder (layers and lm_head) in place. A tied lm_head gets
    its own int8 copy; the embedding table stays float for lookups."""
    for name, module in list(text.named_modules()):
        for child, sub in list(module.named_children()):
            if isinstance(sub, nn.Linear):
                setattr(module, child, Int8Linear(sub))
