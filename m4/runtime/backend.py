"""What a backend is: the interface the context, the live context and the API run on.

A backend encodes images and runs the decoder on embeddings against its cache (torch, ONNX
Runtime, TensorRT). Embeddings and caches are the backend's own arrays (torch tensors on its
device, numpy arrays, GPU buffers): nothing above it looks inside them, it only passes them
back. Logits come back as float32 numpy for the sampler.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from m4.model.config import Arch

Embeddings = Any  # (T, H) or (n, tokens_per_image, H) in the backend's arrays
Cache = Any  # one context's preallocated KV cache, made by new_cache


class Backend(Protocol):
    name: str  # "torch", "onnx", "trt"
    arch: Arch

    def encode_images(self, pixels: np.ndarray) -> Embeddings:
        """(n, 3, S, S) float32 pixels -> (n, tokens_per_image, H) embeddings."""

    def embed_tokens(self, ids: list[int]) -> Embeddings:
        """Token ids -> their (T, H) rows of the embedding table."""

    def concat(self, parts: list[Embeddings]) -> Embeddings:
        """(T_i, H) pieces -> one (sum T_i, H)."""

    def new_cache(self, max_len: int) -> Cache:
        """A cache of max_len positions (an M4Error where the model has fewer)."""

    def forward(self, embeds: Embeddings, pos: int, cache: Cache, last_only: bool = True) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T), written into the cache -> float32
        logits of the last position (1, vocab), or of every position (T, vocab)."""

    def decode(self, embeds: Embeddings, positions: list[int], caches: list[Cache],
               greedy: bool = False) -> np.ndarray | list[int]:
        """One decode step of several contexts: row i's token (embeds[i]) at positions[i] of
        caches[i], written into it -> float32 logits (B, vocab), or with `greedy` each row's
        most likely token. Each row's equal what `forward` gives that context alone; the
        weights are read once for all rows where the backend can batch them."""


class Shifting(Backend, Protocol):
    """A backend that can also evict approximately (Context.shift_out): not every one can."""

    def shift(self, cache: Cache, start: int, end: int, by: int) -> None:
        """Move cached positions [start, end) to [start - by, end - by), keys re-rotated."""


def embed_parts(backend: Backend, parts: list[list[int] | int], images) -> Embeddings:
    """Prompt parts (m4.prompt) -> the decoder's input embeddings: text runs looked up, image
    slots filled from `images` (encoded embeddings, indexed by the slot's image index)."""
    return backend.concat([backend.embed_tokens(x) if isinstance(x, list) else images[x] for x in parts])
