"""The two graphs of a bundle, as torch modules over the compact model's weights.

`VisionGraph`: pixels (n, 3, S, S) -> projected embeddings (n, tokens, H); n is dynamic.

`DecoderGraph`: one forward of the decoder against a static cache that the runtime owns.
Inputs: `inputs_embeds` (1, T, H); `past_len`, a scalar: cache positions [0, past_len) are
valid; `logits_index` (K,): which of the T positions get logits (the last, or all); per
layer `past_key.i` (1, kv, D, M) and `past_value.i` (1, kv, M, D), one M for all.
Outputs: `logits` (1, K, vocab), `new_keys` (layers, kv, D, T) and `new_values` (layers,
kv, T, D): only the new positions, which the runtime writes into its buffers at
[past_len, past_len + T). Attention reads the cache where it lies, past keys j < past_len
and the new keys causally beside them: nothing is concatenated to the cache. Keys are kept
transposed so that both attention products are plain matmuls (a transposed operand would
be repacked, a copy of the cache, on every step). Standard ONNX ops only, so TensorRT
builds the same file.
"""

import torch
from torch import nn

from m4.model.llava import LLaVA
from m4.model.qwen2 import Attention, Qwen2, RMSNorm, rotate


class VisionGraph(nn.Module):
    def __init__(self, model: LLaVA):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


def qkv(a: Attention) -> nn.Linear:
    """The fused q, k and v projection with softmax's 1/sqrt(D) folded into the queries
    (rotation is linear): a scale left in the graph would make ORT fuse it into a
    FusedMatMul, which repacks the cache on every step."""
    p = a.qkv_proj
    scale = torch.ones(p.out_features, dtype=p.weight.dtype, device=p.weight.device)
    scale[:a.heads * a.head_dim] = a.head_dim ** -0.5
    f = nn.Linear(p.in_features, p.out_features, device="meta")
    f.weight = nn.Parameter(p.weight * scale[:, None], requires_grad=False)
    f.bias = nn.Parameter(p.bias * scale, requires_grad=False)
    return f


def rms_norm(n: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # the model's x * rsqrt(mean + eps) written as x / sqrt(mean + eps): the same value,
    # in the form ONNX Runtime fuses into one SimplifiedLayerNormalization
    xf = x.float()
    return n.weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + n.eps)).to(x.dtype)


class DecoderGraph(nn.Module):
    def __init__(self, text: Qwen2):
        super().__init__()
        self.text = text
        self.qkv = nn.ModuleList(qkv(layer.self_attn) for layer in text.layers)

    def forward(self, inputs_embeds, past_len, logits_index, past: list[torch.Tensor]):
        x, text = inputs_embeds, self.text
        t, m = x.shape[1], past[1].shape[2]
        steps = torch.arange(t, device=x.device)
        cos, sin = (r.index_select(0, past_len + steps).to(x.dtype) for r in (text.cos, text.sin))
        # additive masks: cache positions below past_len (one row for all queries), new
        # positions causally (tiled over the query heads that share a kv head)
        attn = text.layers[0].self_attn
        zero, hidden = torch.tensor(0.0, dtype=x.dtype), torch.tensor(float("-inf"), dtype=x.dtype)
        mask = (torch.where(torch.arange(m, device=x.device) < past_len, zero, hidden),
                torch.where(steps[None, :] <= steps[:, None], zero, hidden).repeat(attn.heads // attn.kv_heads, 1))
        new_k, new_v = [], []
        for i, layer in enumerate(text.layers):
            a, k, v = self.attend(i, rms_norm(layer.input_layernorm, x), cos, sin, past[2 * i], past[2 * i + 1], mask)
            x = x + a
            x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
            new_k.append(k)
            new_v.append(v)
        logits = text.lm_head(rms_norm(text.norm, x.index_select(1, logits_index)))
        return logits, torch.cat(new_k), torch.cat(new_v)

    def attend(self, i, x, cos, sin, past_kt, past_v, mask):
        """Self-attention of x (1, T, H) over the cache and itself -> (output, new keys
        (1, kv, D, T), new values (1, kv, T, D))."""
        attn = self.text.layers[i].self_attn
        t, d, h, kv = x.shape[1], attn.head_dim, attn.heads, attn.kv_heads
        qk, v = self.qkv[i](x).view(1, t, h + 2 * kv, d).transpose(1, 2).split([h + kv, kv], dim=1)
        q, k = rotate(qk, cos, sin).split([h, kv], dim=1)
        kt = k.transpose(2, 3)
        # GQA without repeating the cache: a kv head's query heads become rows of one matmul
        q = q.reshape(1, kv, -1, d)
        scores = torch.cat([q @ past_kt + mask[0], q @ kt + mask[1]], dim=-1)
        p_past, p_new = scores.float().softmax(-1).to(x.dtype).split([past_kt.shape[3], t], dim=-1)
        y = (p_past @ past_v + p_new @ v).reshape(1, h, t, d).transpose(1, 2).reshape(1, t, -1)
        return attn.o_proj(y), kt, v
