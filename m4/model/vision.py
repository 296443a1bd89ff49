"""The vision tower, SigLIP or CLIP: patch embedding, then pre-norm transformer layers.

CLIP puts a learnt class token in front of the patches and a layer norm before the first
layer (transformers' `pre_layrnorm`, spelled as its checkpoints spell it); SigLIP has
neither. LLaVA reads hidden states from inside the tower (`vision_feature_layer`), never
the pooled head or the post-layernorm, so neither exists here, and only the layers up to
the deepest one read are built.
"""

import torch
import torch.nn.functional as F
from torch import nn

from m4.model.activations import ACTIVATIONS
from m4.model.config import VisionArch
from m4.model.fused import FusedLinear


class Embeddings(nn.Module):
    def __init__(self, a: VisionArch):
        super().__init__()
        clip = a.kind == "clip"
        self.patch_embedding = nn.Conv2d(3, a.hidden, a.patch_size, stride=a.patch_size, bias=not clip)
        self.class_embedding = nn.Parameter(torch.zeros(a.hidden)) if clip else None
        self.position_embedding = nn.Embedding(a.positions, a.hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, positions, C)
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        out: torch.Tensor = x + self.position_embedding.weight
        return out


class Attention(nn.Module):
    def __init__(self, a: VisionArch):
        super().__init__()
        self.heads = a.heads
        self.qkv_proj = FusedLinear(a.hidden, dict.fromkeys(("q_proj", "k_proj", "v_proj"), a.hidden), bias=True)
        self.out_proj = nn.Linear(a.hidden, a.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        q, k, v = self.qkv_proj(x).view(n, p, 3 * self.heads, c // self.heads).transpose(1, 2).chunk(3, dim=1)
        y = F.scaled_dot_product_attention(q, k, v)
        out: torch.Tensor = self.out_proj(y.transpose(1, 2).reshape(n, p, c))
        return out


class MLP(nn.Module):
    def __init__(self, a: VisionArch):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(a.hidden, a.mlp), nn.Linear(a.mlp, a.hidden)
        self.act = ACTIVATIONS[a.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.act(self.fc1(x)))
        return out


class Layer(nn.Module):
    def __init__(self, a: VisionArch):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(a.hidden, eps=a.eps)
        self.self_attn = Attention(a)
        self.layer_norm2 = nn.LayerNorm(a.hidden, eps=a.eps)
        self.mlp = MLP(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        out: torch.Tensor = x + self.mlp(self.layer_norm2(x))
        return out


class VisionTower(nn.Module):
    def __init__(self, a: VisionArch, layers: int):
        super().__init__()
        self.embeddings = Embeddings(a)
        self.pre_layrnorm = nn.LayerNorm(a.hidden, eps=a.eps) if a.kind == "clip" else nn.Identity()
        self.layers = nn.ModuleList(Layer(a) for _ in range(layers))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """All hidden states, transformers' order: [embeddings (CLIP: normed), after layer 1, ...]."""
        states = [self.pre_layrnorm(self.embeddings(pixels))]
        for layer in self.layers:
            states.append(layer(states[-1]))
        return states
