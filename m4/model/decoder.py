"""The decoder (Qwen2 and Llama, which differ in biases and RoPE scaling: TextArch), defined
once: the torch runtime, decoder.onnx and decoder_ort.onnx are all made from these modules.

Positions are always a tensor, `input_pos` (T,), as in gpt-fast: one attention path for a
prompt, a chunk and a token, with no shape that depends on a position's value, so the same
step replays from a CUDA graph at every position.

Where the keys and values live is the cache's business. A cache has two methods:
`mask(input_pos, groups)`, built once per forward, and `attend(layer, q, k, v,
input_pos, mask)`, which stores the new keys and values and returns the attention output.
`KVCache` below is the runtime's: preallocated buffers written in place at `input_pos`,
attention over the whole buffer it is given, masked causally. A caller that wants attention
to cost only the filled part passes a view of the first positions (`KVCache.prefix`).
`Rows` is a decode step over several contexts' caches: `input_pos` (B, T), one row of
positions per context; the linears run over all rows at once (one read of the weights),
attention row by row over each context's own cache.
decoder.onnx's cache (m4/export/graphs.py) reads a past it does not write and returns the
new keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from m4.model.activations import ACTIVATIONS
from m4.model.config import TextArch
from m4.model.fused import FusedLinear
from m4.model.rope import rope_table


@dataclass
class KVCache:
    k: torch.Tensor  # (layers, 1, kv_heads, max_len, head_dim)
    v: torch.Tensor
    filled: bool = False  # a view that ends at the last query's position (`prefix`)

    @classmethod
    def empty(cls, a: TextArch, max_len: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (a.layers, 1, a.kv_heads, max_len, a.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def prefix(self, length: int) -> KVCache:
        """A view of positions [0, length), the last query's position last: writes land in
        this cache, attention reads only them."""
        return KVCache(self.k[:, :, :, :length], self.v[:, :, :, :length], filled=True)

    def mask(self, input_pos: torch.Tensor, groups: int) -> torch.Tensor | None:
        """(groups * T, max_len) bool: query i sees the cache up to its own position. Rows
        are tiled over the query heads that share a kv head (see `attend`). None where one
        query sees all of a filled view: SDPA without a mask takes its faster kernel."""
        if self.filled and input_pos.shape[0] == 1:
            return None
        return (torch.arange(self.max_len, device=input_pos.device) <= input_pos[:, None]).repeat(groups, 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """q (1, heads, T, D), k and v (1, kv_heads, T, D) -> (1, heads, T, D)."""
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(2, input_pos, k)
        values.index_copy_(2, input_pos, v)
        # GQA without repeating the cache: a kv head's query heads become rows of one query
        b, h, t, d = q.shape
        y = F.scaled_dot_product_attention(q.reshape(b, keys.shape[1], -1, d), keys, values, attn_mask=mask)
        return y.reshape(b, h, t, d)  # CUDA kernels may return it strided


@dataclass
class Rows:
    caches: list[KVCache]  # row b's cache: a `prefix` view ending at its last position, or whole

    def mask(self, input_pos: torch.Tensor, groups: int) -> list[torch.Tensor | None]:
        """Each row's mask over its own cache, made once for every layer."""
        return [c.mask(input_pos[b], groups) for b, c in enumerate(self.caches)]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
               mask: list[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat([c.attend(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1], input_pos[b], mask[b])
                          for b, c in enumerate(self.caches)])


class Cache(Protocol):
    """Where a forward's keys and values go (KVCache, Rows, decoder.onnx's past-and-new)."""

    def mask(self, input_pos: torch.Tensor, groups: int) -> Any:
        """Made once per forward, handed to every layer's `attend`."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
               mask: Any) -> torch.Tensor:
        """Store the new keys and values; the attention output."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 and cast back before the weight, as transformers does; written out
        # rather than F.rms_norm, which on the CPU costs several times these few kernels
        xf = x.float()
        if torch.onnx.is_in_onnx_export():
            # x / sqrt(mean + eps): the form ONNX Runtime fuses into one SimplifiedLayerNormalization
            normed = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: TextArch, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, a.heads, a.kv_heads, a.head_dim
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        self.qkv_proj = FusedLinear(a.hidden, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias=a.qkv_bias)
        self.o_proj = nn.Linear(q, a.hidden, bias=a.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache, input_pos: torch.Tensor,
                mask: Any) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv = self.heads, self.kv_heads
        qk, v = torch.split(self.qkv_proj(x).view(b, t, h + 2 * kv, self.head_dim).transpose(1, 2), [h + kv, kv], dim=1)
        q, k = torch.split(rotate(qk, cos, sin), [h, kv], dim=1)  # queries and keys in one rotation
        y = cache.attend(self.layer, q, k, v, input_pos, mask)
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        return out


class MLP(nn.Module):
    def __init__(self, a: TextArch):
        super().__init__()
        self.gate_up_proj = FusedLinear(a.hidden, {"gate_proj": a.mlp, "up_proj": a.mlp}, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.mlp, a.hidden, bias=a.mlp_bias)
        self.act = ACTIVATIONS[a.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out: torch.Tensor = self.down_proj(self.act(gate) * up)
        return out


class Layer(nn.Module):
    def __init__(self, a: TextArch, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden, a.eps)
        self.self_attn = Attention(a, index)
        self.post_attention_layernorm = RMSNorm(a.hidden, a.eps)
        self.mlp = MLP(a)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache, input_pos: torch.Tensor,
                mask: Any) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, input_pos, mask)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class Decoder(nn.Module):
    cos: torch.Tensor  # buffers, registered below
    sin: torch.Tensor

    def __init__(self, a: TextArch):
        super().__init__()
        self.arch, self.groups = a, a.heads // a.kv_heads
        self.embed_tokens = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList(Layer(a, i) for i in range(a.layers))
        self.norm = RMSNorm(a.hidden, a.eps)
        self.lm_head = nn.Linear(a.hidden, a.vocab, bias=False)
        cos, sin = rope_table(a)
        self.register_buffer("cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("sin", torch.from_numpy(sin), persistent=False)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache: Cache,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (B, T, H) at positions `input_pos`, (T,) shared by the rows or (B, T),
        -> logits (B, K, vocab) of the positions `logits_index` (K,) (None: every one)."""
        # angles (T, D) or (B, 1, T, D): either broadcasts over the heads
        cos, sin = (r[input_pos].to(x.dtype) if input_pos.dim() == 1 else r[input_pos][:, None].to(x.dtype)
                    for r in (self.cos, self.sin))
        mask = cache.mask(input_pos, self.groups)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, input_pos, mask)
        if logits_index is not None:
            x = x.index_select(1, logits_index)
        out: torch.Tensor = self.lm_head(self.norm(x))
        return out
