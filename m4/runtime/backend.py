"""What a backend is: the interface the context, the live context and the API run on.

A backend encodes images and runs the decoder on embeddings against its cache (torch, ONNX
Runtime, TensorRT). Embeddings, caches and a decode step's logits are the backend's own
arrays (torch tensors on its device, numpy arrays, GPU buffers): nothing above it looks
inside them, it only passes them back: the runtime's logits stay where the backend computed
them, so that a greedy token is picked there; `forward` returns float32 numpy logits (for
measurements and tests).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from m4.errors import M4Error
from m4.model.config import Arch

Embeddings = Any  # (T, H) or (n, tokens_per_image, H) in the backend's arrays
Cache = Any  # one context's preallocated KV cache, made by new_cache
Logits = Any  # (B, vocab) logits of a prefill or a decode step, where the backend computed them

# Pooled caches (torch's static steps, ONNX Runtime's pages) are sized up to a multiple of
# this: contexts of near sizes reuse one buffer, and a step that reads the whole buffer masks
# at most this many positions more than it needs.
CACHE_BUCKET = 256


def bucketed(max_len: int) -> int:
    """max_len rounded up to a multiple of CACHE_BUCKET."""
    return -(-max_len // CACHE_BUCKET) * CACHE_BUCKET


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

    def prefill(self, embeds: Embeddings, pos: int, cache: Cache) -> Logits:
        """Embeddings (T, H) at positions [pos, pos + T), written into the cache -> the last
        position's logits (1, vocab) in the backend's arrays."""

    def decode(self, embeds: Embeddings, positions: list[int], caches: list[Cache]) -> Logits:
        """One decode step of any number of contexts: row i's token (embeds[i]) at
        positions[i] of caches[i], written into it -> logits (B, vocab) in the backend's
        arrays. One row runs its context's own step, a prefill of one token (on CUDA, the
        graph captured for its cache); several read the weights once for all rows where the backend can batch them.
        Each row's logits equal what `forward` gives that context alone."""

    def mask(self, logits: Logits, rows: list[int], allowed: np.ndarray) -> Logits:
        """The logits with the tokens not allowed (allowed: (len(rows), vocab) bool) of each
        of `rows` set to -inf, where the logits are: a constrained answer's row (m4.constraint)
        before its token is chosen."""

    def host(self, logits: Logits) -> np.ndarray:
        """`prefill`'s or `decode`'s logits (or some of their rows) as float32 numpy, for
        the sampler."""

    def save_prefix(self, cache: Cache, n: int) -> Cache:
        """A copy of the cache's first n positions, a cache of n positions of its own (what
        the prefix cache keeps, m4.runtime.reuse)."""

    def load_prefix(self, cache: Cache, saved: Cache, n: int) -> None:
        """The first n positions of `saved` (save_prefix's) into the cache's first n."""

    def nbytes(self, x: Embeddings | Cache) -> int:
        """The memory embeddings or a cache hold (what the caches of m4.runtime.reuse count)."""


@runtime_checkable
class Shifting(Backend, Protocol):
    """A backend that can also evict approximately (Context.shift_out): not every one can."""

    def shift(self, cache: Cache, start: int, end: int, by: int) -> None:
        """Move cached positions [start, end) to [start - by, end - by), keys re-rotated."""


def shifting(backend: Backend) -> Shifting:
    """The backend, as one that can evict approximately (an M4Error where it cannot)."""
    if not isinstance(backend, Shifting):
        raise M4Error(f"approximate eviction is not available on the {backend.name} backend")
    return backend


def spans(parts: list[list[int] | int], tokens_per_image: int) -> list[tuple[list[int] | int, int, int]]:
    """Prompt parts (m4.prompt) with the positions [start, end) each takes."""
    out, at = [], 0
    for x in parts:
        end = at + (len(x) if isinstance(x, list) else tokens_per_image)
        out.append((x, at, end))
        at = end
    return out


def embed_parts(backend: Backend, parts: list[list[int] | int], images: Any, start: int = 0) -> Embeddings:
    """Prompt parts (m4.prompt) -> the decoder's input embeddings from position `start` on
    (the earlier ones are cached): text runs looked up, image slots filled from `images`
    (encoded embeddings, indexed by the slot's image index); a part `start` cuts gives its
    tokens from there."""
    return backend.concat([backend.embed_tokens(x[max(0, start - at):]) if isinstance(x, list)
                           else images[x][max(0, start - at):]
                           for x, at, end in spans(parts, backend.arch.tokens_per_image) if end > start])
