"""Requests that do not start from zero: an encoder cache and a prefix cache, each bounded
in bytes and evicting the entry used least recently.

- `ImageCache`: an image's embeddings by a hash of its preprocessed pixels; an image seen
  before, in the same request or an earlier one, is not encoded again.
- `PrefixCache`: the keys and values of recent prompts by their tokens, each image token
  named by its image's hash and its index in the image. A prompt loads the longest prefix
  it shares with an entry into its own cache and prefills only the rest; the prefix may end
  inside an image, and the rest then starts inside that image's embeddings. A position's
  keys and values depend only on the tokens up to it, so the loaded ones are what a prefill
  of the whole prompt writes there (to the rounding of a prefill in other chunks).

An entry that a longer prompt extends is replaced by it, and a prompt whose keys and values
exceed the bound keeps its beginning. `Reuse` holds both caches for one model:
`m4.load(..., cache_mb=...)`, the server's --image-cache-mb and --prefix-cache-mb; a cache
of 0 bytes is off. Entries are the backend's arrays (a GPU's on the GPU), counted by
`backend.nbytes`; the keys, a few bytes a token, are not counted.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m4.errors import M4Error
from m4.runtime.backend import Backend, Cache, Embeddings, embed_parts, spans
from m4.runtime.context import Context

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value

Key = tuple[Hashable, ...]  # a prompt's tokens: a text token's id, an image token's (image hash, index)


class Lru:
    """Entries bounded by their bytes together; the one used least recently goes first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()  # key -> (value, bytes)
        self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> Any:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        """Kept, the least recently used going until the rest fit (an entry larger than the
        whole bound is not kept, and evicts nothing)."""
        if size > self.limit:
            return
        self.remove(key)
        while self.bytes + size > self.limit:  # room made first: `bytes` never reads over the bound
            self.remove(next(iter(self.entries)))
            self.evictions += 1
        self.entries[key] = value, size
        self.bytes += size

    def remove(self, key: Hashable) -> None:
        if key in self.entries:
            self.bytes -= self.entries.pop(key)[1]


def map_large_blocks() -> None:
    """Give an evicted entry's memory back to the system. glibc maps blocks above a threshold
    that it raises each time such a block is freed, up to 32 MB; then entries of a few MB
    land on its heap, which keeps what is freed: measured, a server's memory settled about
    200 MB above its caches' bounds. A fixed threshold (which mallopt sets) keeps every entry
    mapped. Elsewhere than glibc, nothing is done."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def digest(pixels: np.ndarray) -> bytes:
    """An image's name: a hash of its preprocessed float32 pixels."""
    return hashlib.blake2b(np.ascontiguousarray(pixels, np.float32).tobytes(), digest_size=16).digest()


class ImageCache(Lru):
    def encode(self, backend: Backend, pixels: np.ndarray, names: list[bytes]) -> list[Embeddings]:
        """Each image's (tokens, H) embeddings: those in the cache from it, the others (each
        once, however often it appears) encoded in one vision call and kept."""
        found = {name: self.get(name) for name in names}
        missing = [name for name, e in found.items() if e is None]
        self.misses += len(missing)
        self.hits += len(names) - len(missing)
        if missing:
            encoded = backend.encode_images(pixels[[names.index(name) for name in missing]])
            for name, e in zip(missing, encoded):
                e = backend.concat([e])  # a copy of its own: a view would hold the whole batch
                self.put(name, e, backend.nbytes(e))
                found[name] = e
        return [found[name] for name in names]


def shared(a: Key, b: Key) -> int:
    """The length of the longest common prefix of a and b (a binary search of slices
    compared in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache(Lru):
    def longest(self, key: Key) -> tuple[int, Cache | None]:
        """The longest prefix of `key` an entry holds: its length and the entry's saved cache
        (0 and None where none shares a token); a hit or a miss."""
        best, found = 0, None
        for k in self.entries:
            if (n := shared(k, key)) > best:
                best, found = n, k
        if found is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        return best, self.get(found)

    def keep(self, key: Key, saved: Cache, size: int) -> None:
        """A prompt's keys and values; an entry whose key begins this one is dropped: this one
        serves every prompt that one would, and as long a prefix."""
        if size <= self.limit:
            for k in [k for k in self.entries if len(k) <= len(key) and k == key[:len(k)]]:
                self.remove(k)
        self.put(key, saved, size)


def prompt_key(parts: list[list[int] | int], names: Sequence[bytes], tokens_per_image: int) -> Key:
    """A prompt's tokens as the prefix cache names them."""
    out: list[Hashable] = []
    for x in parts:
        out += x if isinstance(x, list) else [(names[x], i) for i in range(tokens_per_image)]
    return tuple(out)


@dataclass
class Pending:
    """A prompt to keep once prefilled: its key, and how much of it the cache held."""

    key: Key
    matched: int


class Reuse:
    """The encoder cache and the prefix cache of one model, sizes in MB (0: off)."""

    def __init__(self, image_mb: float = 0, prefix_mb: float = 0):
        if image_mb < 0 or prefix_mb < 0:
            raise M4Error(f"a cache's size is 0 (off) or more MB, not {min(image_mb, prefix_mb):g}")
        if image_mb or prefix_mb:
            map_large_blocks()
        self.images = ImageCache(int(image_mb * 2**20))
        self.prefixes = PrefixCache(int(prefix_mb * 2**20))

    @classmethod
    def split(cls, mb: float) -> Reuse:
        """`mb` in all, a third for images and the rest for prefixes (as the server's
        defaults share theirs)."""
        return cls(mb / 3, mb * 2 / 3)

    def encode(self, backend: Backend, pixels: np.ndarray, names: list[bytes] | None = None) -> Sequence[Embeddings]:
        """(n, 3, S, S) pixels (named by `digest`, or here) -> each image's (tokens, H)
        embeddings, through the encoder cache where it is on."""
        if not self.images.limit:
            return backend.encode_images(pixels)  # type: ignore[no-any-return]
        return self.images.encode(backend, pixels, names or [digest(p) for p in pixels])

    def resume(self, ctx: Context, parts: list[list[int] | int],
               pixels: np.ndarray | None) -> tuple[Embeddings, Pending | None]:
        """A prompt into an empty context, up to its prefill: the longest prefix the prefix
        cache holds loaded (its last token, at least, is left for the prefill's logits) ->
        the embeddings of the rest (of its images only those not wholly cached, through
        `encode`), and what to `keep` after the prefill (None: nothing)."""
        backend, tokens = ctx.backend, ctx.backend.arch.tokens_per_image
        names = [digest(p) for p in pixels] if pixels is not None and (self.images.limit or self.prefixes.limit) else []
        pending, start = None, 0
        if self.prefixes.limit:
            key = prompt_key(parts, names, tokens)
            matched, saved = self.prefixes.longest(key)
            start = min(matched, len(key) - 1)
            if start:
                ctx.load(saved, start)
            pending = Pending(key, matched)
        needed = [x for x, _, end in spans(parts, tokens) if isinstance(x, int) and end > start]
        images: dict[int, Embeddings] = {}
        if needed:
            assert pixels is not None
            encoded = self.encode(backend, pixels[needed], [names[i] for i in needed] if names else None)
            images = dict(zip(needed, encoded))
        return embed_parts(backend, parts, images, start), pending

    def keep(self, ctx: Context, pending: Pending | None) -> None:
        """The prompt's keys and values, just prefilled, into the prefix cache: as many of its
        first positions as the bound holds (a prompt over it keeps its beginning), unless an
        entry holds as many already."""
        if pending is None:
            return
        backend = ctx.backend
        n = min(len(pending.key), self.prefixes.limit // backend.nbytes(backend.save_prefix(ctx.cache, 1)))
        if n > pending.matched:
            saved = backend.save_prefix(ctx.cache, n)
            self.prefixes.keep(pending.key[:n], saved, backend.nbytes(saved))

    def stats(self) -> dict[str, dict[str, int]]:
        """Each cache's hits, misses, evictions, bytes held and bound."""
        return {name: {"hits": c.hits, "misses": c.misses, "evictions": c.evictions, "bytes": c.bytes,
                       "limit": c.limit} for name, c in (("image", self.images), ("prefix", self.prefixes))}
