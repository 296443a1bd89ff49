"""The torch backend: the compact model on CPU or CUDA.

A backend does two things, encode images and run the decoder on embeddings against its
cache; everything above it (prompts, contexts, sampling) is backend-independent. Embeddings
stay in the backend's own arrays (here torch tensors on its device); logits come back as
numpy for the sampler.
"""

from pathlib import Path

import numpy as np
import torch

from m4.model.checkpoint import load_model
from m4.model.config import Arch
from m4.model.qwen2 import KVCache, rotate


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TorchBackend:
    name = "torch"

    def __init__(self, path: Path, arch: Arch, device: str = "cpu", dtype: str | None = None):
        self.device = pick_device(device)
        self.dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.arch = arch
        self.model = load_model(path, arch, self.dtype, self.device)

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        """(n, 3, S, S) float32 pixels -> (n, tokens_per_image, H) embeddings."""
        x = torch.from_numpy(pixels).to(self.device, self.dtype)
        return self.model.encode_images(x)

    @torch.inference_mode()
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, device=self.device))

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache.empty(self.arch.text, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T) -> float32 logits (T or 1, vocab)."""
        logits = self.model(embeds[None], pos, cache, last_only)
        return logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def shift(self, cache: KVCache, start: int, end: int, by: int) -> None:
        """Move cached positions [start, end) to [start - by, end - by); RoPE composes, so
        rotating the keys by -by puts them exactly where fresh keys would be."""
        cos, sin = (r[by].to(self.device, self.dtype) for r in (self.model.text.cos, self.model.text.sin))
        keys = cache.k[:, :, :, start:end].clone()  # source and target overlap
        cache.k[:, :, :, start - by:end - by] = rotate(keys, cos, -sin)
        cache.v[:, :, :, start - by:end - by] = cache.v[:, :, :, start:end].clone()
