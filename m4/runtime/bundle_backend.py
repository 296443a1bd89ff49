"""What the bundle backends (ONNX Runtime, TensorRT) share: the manifest and architecture,
the token embedding table, and prefill in chunks. numpy only (no torch)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from m4.bundle_format import DTYPES, PREFILL_CHUNK, manifest_arch, read_manifest
from m4.errors import M4Error


class BundleBackend(ABC):
    """A Backend (m4.runtime.backend) over a bundle; its subclasses run the graphs."""

    name: str

    def __init__(self, path: Path):
        path = Path(path)
        self.manifest = read_manifest(path)
        self.arch = manifest_arch(self.manifest)
        self.dtype = np.dtype(DTYPES[self.manifest["dtype"]])
        # memory-mapped: a 150k-row table costs only the rows a prompt looks up
        self.table = np.load(path / "embed_tokens.npy", mmap_mode="r")
        self.chunk = PREFILL_CHUNK

    @abstractmethod
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 pixels -> (n, tokens_per_image, H) embeddings."""

    @abstractmethod
    def new_cache(self, max_len: int) -> Any:
        """A cache of max_len positions."""

    @abstractmethod
    def save_prefix(self, cache: Any, n: int) -> Any:
        """A copy of the cache's first n positions, a cache of its own."""

    @abstractmethod
    def load_prefix(self, cache: Any, saved: Any, n: int) -> None:
        """The first n positions of `saved` into the cache's first n."""

    @abstractmethod
    def nbytes(self, x: Any) -> int:
        """The memory embeddings or a cache hold."""

    def embed_tokens(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self.table[ids], dtype=self.dtype)

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)

    def forward(self, embeds: np.ndarray, pos: int, cache: Any, last_only: bool = True) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T) -> float32 logits (T or 1, vocab)."""
        return self.logits(embeds, pos, cache, last_only)

    def prefill(self, embeds: np.ndarray, pos: int, cache: Any) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T) -> the last position's float32
        logits (1, vocab)."""
        return self.logits(embeds, pos, cache, True)

    def decode(self, embeds: np.ndarray, positions: list[int], caches: list[Any]) -> np.ndarray:
        """One decode step of any number of contexts -> float32 logits (B, vocab) on the host.
        One row runs its context's own step; several, as `rows` batches them."""
        if len(caches) == 1:
            return self.prefill(embeds, positions[0], caches[0])
        return self.rows(embeds, positions, caches)

    def mask(self, logits: np.ndarray, rows: list[int], allowed: np.ndarray) -> np.ndarray:
        """On the host, into a copy: the logits may be a buffer the next run writes."""
        out = logits.copy()
        out[rows] = np.where(allowed, out[rows], -np.inf)
        return out

    def host(self, logits: np.ndarray) -> np.ndarray:
        return logits

    @abstractmethod
    def logits(self, embeds: np.ndarray, pos: int, cache: Any, last_only: bool) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T) of one context -> float32 logits."""

    def rows(self, embeds: np.ndarray, positions: list[int], caches: list[Any]) -> np.ndarray:
        """Here one context after another; a backend whose graph takes a batch runs them as one."""
        return np.concatenate([self.logits(embeds[i:i + 1], p, c, True)
                               for i, (p, c) in enumerate(zip(positions, caches))])

    def check_positions(self, max_len: int) -> None:
        if max_len > self.arch.text.max_positions:
            raise M4Error(f"a context of {max_len} tokens exceeds the model's {self.arch.text.max_positions} positions")

    def chunked(self, embeds: np.ndarray, pos: int, last_only: bool,
                run: Callable[[np.ndarray, int, np.ndarray], np.ndarray]) -> np.ndarray:
        """A prefill in pieces of at most `chunk` tokens: run(piece, its position, which of
        its rows get logits) for each; the logits asked for. The graph returns at least one
        row of logits, so a non-final piece under last_only computes one that is dropped."""
        t, out = embeds.shape[0], []
        for s in range(0, t, self.chunk):
            piece = embeds[s:s + self.chunk]
            last = s + self.chunk >= t
            keep = np.array([len(piece) - 1]) if last_only else np.arange(len(piece))
            logits = run(piece, pos + s, keep)
            if last or not last_only:
                out.append(logits)
        return np.concatenate(out)
