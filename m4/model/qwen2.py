"""Qwen2 decoder over a static KV cache that the caller owns.

The cache is preallocated once (`KVCache`) and written in place at positions
[pos, pos + T); attention reads the view [0, pos + T). Nothing is concatenated or copied,
so rolling back is just using a smaller `pos` next time.

`pos` is an int, or a 0-d long tensor for the same step with static shapes: keys are
written with index_copy_ and attention reads the whole buffer under a mask, so no shape
depends on the position and one captured CUDA graph replays the step at every position.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from m4.model.activations import ACTIVATIONS
from m4.model.config import TextArch
from m4.model.fused import FusedLinear


@dataclass
class KVCache:
    k: torch.Tensor  # (layers, 1, kv_heads, max_len, head_dim)
    v: torch.Tensor

    @classmethod
    def empty(cls, a: TextArch, max_len: int, dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (a.layers, 1, a.kv_heads, max_len, a.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def rope_table(a: TextArch) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, (max_positions, head_dim), in float32 as Qwen2 does."""
    inv_freq = 1.0 / a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32, device="cpu") / a.head_dim)
    freqs = torch.outer(torch.arange(a.max_positions, dtype=torch.float32, device="cpu"), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 and cast back before the weight, as Qwen2 does; F.rms_norm is one kernel
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: TextArch):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, a.head_dim
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        self.qkv_proj = FusedLinear(a.hidden, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias=True)
        self.o_proj = nn.Linear(a.heads * a.head_dim, a.hidden, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache, pos: int | torch.Tensor, mask=None) -> torch.Tensor:
        """`pos` the first position, or (static shapes) a tensor of the T positions with
        `mask` saying which cache entries each query row sees."""
        b, t, _ = x.shape
        h, kv = self.heads, self.kv_heads
        qk, v = self.qkv_proj(x).view(b, t, h + 2 * kv, self.head_dim).transpose(1, 2).split([h + kv, kv], dim=1)
        q, k = rotate(qk, cos, sin).split([h, kv], dim=1)  # queries and keys in one rotation
        static = isinstance(pos, torch.Tensor)
        if static:
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            keys, values = k_cache, v_cache
        else:
            k_cache[:, :, pos:pos + t] = k
            v_cache[:, :, pos:pos + t] = v
            keys, values = k_cache[:, :, :pos + t], v_cache[:, :, :pos + t]
        if not static and t > 1 and self.heads == self.kv_heads:  # prefill after pos cached tokens
            # lower-right causal (query i sees keys up to pos + i): CUDA runs it in the flash
            # kernel, where a dense mask would send a long chunk to the slow kernels
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(t, pos + t))
        else:
            # Each kv head's query heads become rows of one query matrix (GQA without copying
            # the cache); query i of the chunk sees keys up to pos + i.
            g = self.heads // self.kv_heads
            if not static and t > 1:
                mask = torch.arange(pos + t, device=x.device) <= torch.arange(pos, pos + t, device=x.device)[:, None]
                mask = mask.repeat(g, 1)
            y = F.scaled_dot_product_attention(q.reshape(b, self.kv_heads, g * t, self.head_dim), keys, values,
                                               attn_mask=mask)
            y = y.reshape(b, self.heads, t, self.head_dim)  # CUDA kernels may return it strided
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, a: TextArch):
        super().__init__()
        self.gate_up_proj = FusedLinear(a.hidden, {"gate_proj": a.mlp, "up_proj": a.mlp}, bias=False)
        self.down_proj = nn.Linear(a.mlp, a.hidden, bias=False)
        self.act = ACTIVATIONS[a.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Layer(nn.Module):
    def __init__(self, a: TextArch):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden, a.eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden, a.eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, k_cache, v_cache, pos: int | torch.Tensor, mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2(nn.Module):
    def __init__(self, a: TextArch):
        super().__init__()
        self.groups = a.heads // a.kv_heads
        self.embed_tokens = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList(Layer(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.hidden, a.eps)
        self.lm_head = nn.Linear(a.hidden, a.vocab, bias=False)
        cos, sin = rope_table(a)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """Embeddings (1, T, H) at positions [pos, pos + T) -> logits (1, T or 1, vocab)."""
        t, mask = x.shape[1], None
        if isinstance(pos, torch.Tensor):  # static shapes: positions and mask built once, on the device
            pos = pos + torch.arange(t, device=x.device)
            mask = (torch.arange(cache.max_len, device=x.device) <= pos[:, None]).repeat(self.groups, 1)
            cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        else:
            cos, sin = (r[pos:pos + t].to(x.dtype) for r in (self.cos, self.sin))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], pos, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))
