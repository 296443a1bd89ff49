"""The two traced graphs of a bundle: thin wrappers that fix the interface around the one
model definition (m4.model).

`VisionGraph`: pixels (n, 3, S, S) -> projected embeddings (n, tokens, H); n is dynamic.

`DecoderGraph`: one forward of m4.model.decoder.Decoder against caches that the runtime
owns, for B contexts at once. Inputs: `inputs_embeds` (B, T, H); `past_len` (B,): row b's
cache positions [0, past_len[b]) are valid, and its new tokens take positions
[past_len[b], past_len[b] + T); `logits_index` (K,): which of the T positions get logits
(the last, or all); per layer `past_key.i` (B, kv, D, M) and `past_value.i` (B, kv, M, D),
one M for all. Outputs: `logits` (B, K, vocab), `new_keys` (layers, B, kv, D, T) and
`new_values` (layers, B, kv, T, D): only the new positions, which the runtime writes into
its buffers. Standard ONNX ops only, so TensorRT builds the same file.
"""

from typing import cast

import torch
from torch import nn

from m4.model.decoder import Decoder, Layer
from m4.model.llava import LLaVA


class VisionGraph(nn.Module):
    def __init__(self, model: LLaVA):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class PastCache:
    """decoder.onnx's cache: attention reads the past where it lies, keys j < past_len,
    and the new keys causally beside them; nothing is concatenated to the past, and the
    new keys and values are collected for the graph's outputs. Keys are kept transposed so
    that both attention products are plain matmuls (a transposed operand would be repacked,
    a copy of the cache, on every step). Queries arrive already scaled (`fold_query_scale`)."""

    def __init__(self, past: list[torch.Tensor], past_len: torch.Tensor):
        self.past, self.past_len = past, past_len
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def mask(self, input_pos: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive masks: each row's past positions below its past_len (B, 1, 1, M: one row
        for all its queries); new positions causally, tiled over the query heads that share
        a kv head."""
        dtype, device = self.past[1].dtype, input_pos.device
        zero, hidden = torch.tensor(0.0, dtype=dtype), torch.tensor(float("-inf"), dtype=dtype)
        steps = torch.arange(input_pos.shape[-1], device=device)
        past = torch.arange(self.past[1].shape[2], device=device) < self.past_len[:, None]
        return (torch.where(past, zero, hidden)[:, None, None],
                torch.where(steps[None, :] <= steps[:, None], zero, hidden).repeat(groups, 1))

    def attend(self, layer: int, q, k, v, input_pos, mask) -> torch.Tensor:
        past_kt, past_v = self.past[2 * layer], self.past[2 * layer + 1]
        b, h, t, d = q.shape
        kt = k.transpose(2, 3)
        q = q.reshape(b, k.shape[1], -1, d)  # a kv head's query heads as rows of one matmul
        scores = torch.cat([q @ past_kt + mask[0], q @ kt + mask[1]], dim=-1)
        p_past, p_new = scores.float().softmax(-1).to(q.dtype).split([past_kt.shape[3], t], dim=-1)
        self.new_keys.append(kt)
        self.new_values.append(v)
        return (p_past @ past_v + p_new @ v).reshape(b, h, t, d)


def query_scale(text: Decoder) -> torch.Tensor:
    """Per output row of each qkv projection: softmax's 1/sqrt(D) on the query rows, 1 on the
    keys' and values'. The bundle's decoders carry it folded into the weights (rotation is
    linear): a scale left in decoder.onnx would make ONNX Runtime fuse it into a FusedMatMul,
    which repacks the cache on every step."""
    a = cast(Layer, text.layers[0]).self_attn
    scale = torch.ones(a.qkv_proj.out_features)
    scale[:a.heads * a.head_dim] = a.head_dim ** -0.5
    return scale


class DecoderGraph(nn.Module):
    def __init__(self, text: Decoder):
        super().__init__()
        self.text = text  # its qkv weights carry the query scale (query_scale)

    def forward(self, inputs_embeds, past_len, logits_index, past: list[torch.Tensor]):
        cache = PastCache(past, past_len)
        input_pos = past_len[:, None] + torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        logits = self.text(inputs_embeds, input_pos, cache, logits_index)
        return logits, torch.stack(cache.new_keys), torch.stack(cache.new_values)
