"""LLaVA: vision tower features -> MLP projector -> decoder, the one model runtime and export use."""

import torch
from torch import nn

from m4.model.activations import ACTIVATIONS
from m4.model.config import Arch
from m4.model.decoder import Decoder
from m4.model.vision import VisionTower


class Projector(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.linear_1 = nn.Linear(arch.projector_in, arch.text.hidden, bias=arch.projector_bias)
        self.linear_2 = nn.Linear(arch.text.hidden, arch.text.hidden, bias=arch.projector_bias)
        self.act = ACTIVATIONS[arch.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear_2(self.act(self.linear_1(x)))
        return out


class LLaVA(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.vision = VisionTower(arch.vision, arch.vision_layers_run)
        self.projector = Projector(arch)
        self.text = Decoder(arch.text)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (n, 3, S, S) -> image embeddings (n, tokens_per_image, H)."""
        states = self.vision(pixels)
        features = torch.cat([states[k] for k in self.arch.feature_states], dim=-1)
        if self.arch.strategy == "default":  # drop the first token (CLIP's class token)
            features = features[:, 1:]
        out: torch.Tensor = self.projector(features)
        return out

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.text.embed_tokens(ids)
        return out
