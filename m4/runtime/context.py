"""The interleaved context: a ledger of segments over one preallocated KV cache.

Appending a segment prefills only its tokens at the end of the cache. `mark` and
`rollback` make a question and its answer leave no trace: the cache is written in place,
so rolling back is forgetting lengths, never copying.
"""

from dataclasses import dataclass

from m4.errors import M4Error
from m4.runtime.backend import Backend, Cache, Embeddings, Logits, shifting


@dataclass
class Segment:
    kind: str  # "prompt", "frame", "question", "answer", ...
    length: int  # tokens it holds in the cache


class Context:
    def __init__(self, backend: Backend, max_len: int):
        limit = backend.arch.text.max_positions
        if max_len > limit:  # past it, RoPE has no angles for the positions
            raise M4Error(f"a context of {max_len} tokens exceeds this model's {limit} positions")
        self.backend = backend
        self.cache = backend.new_cache(max_len)
        self.max_len = max_len
        self.segments: list[Segment] = []
        self.length = 0

    def append(self, kind: str, embeds: Embeddings, lengths: list[int] | None = None,
               after: int | None = None) -> Logits:
        """Prefill `embeds` (T, H) at the end of the cache -> the last position's logits
        (1, vocab), where the backend computed them. `after`: the segments from that index
        on are dropped first (the cache is written over in place); `lengths` records the
        prefill as several segments (the frames of a window refilled together)."""
        if after is not None:
            self.rollback(after)
        n = embeds.shape[0]
        self.check_room(n)
        logits = self.backend.prefill(embeds, self.length, self.cache)
        self.record(kind, lengths or [n])
        return logits

    def load(self, saved: Cache, n: int) -> None:
        """The first n positions of a saved prefix (m4.runtime.reuse) into this empty
        context, as one segment: what a prefill of the same tokens would have written."""
        assert self.length == 0
        self.check_room(n)
        self.backend.load_prefix(self.cache, saved, n)
        self.record("cached", [n])

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise M4Error(f"context full: {self.length} + {n} tokens exceed its {self.max_len}")

    def record(self, kind: str, lengths: list[int]) -> None:
        """Segments of these lengths were written at the end of the cache."""
        self.segments += [Segment(kind, k) for k in lengths]
        self.length += sum(lengths)

    def shift_out(self, index: int) -> None:
        """Approximate eviction: drop segment `index` by moving the later ones down in the
        cache with their keys re-rotated to the new positions. The kept tokens still carry
        what they saw of the dropped one, so answers can differ from a fresh prefill."""
        start = sum(s.length for s in self.segments[:index])
        gone = self.segments.pop(index).length
        shifting(self.backend).shift(self.cache, start + gone, self.length, gone)
        self.length -= gone

    def mark(self) -> int:
        return len(self.segments)

    def rollback(self, mark: int) -> None:
        del self.segments[mark:]
        self.length = sum(s.length for s in self.segments)
