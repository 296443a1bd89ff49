"""The interleaved context: a ledger of segments over one preallocated KV cache.

Appending a segment prefills only its tokens at the end of the cache. `mark` and
`rollback` make a question and its answer leave no trace: the cache is written in place,
so rolling back is forgetting lengths, never copying.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from m4.errors import M4Error
from m4.runtime.backend import Backend, Embeddings
from m4.runtime.sampling import Sampling, sample


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
               greedy: bool = False) -> np.ndarray | int:
        """Prefill `embeds` (T, H) after what the cache holds; the last position's logits, or
        with `greedy` its most likely token (picked where the backend's logits are).
        `lengths` records one prefill as several segments (frames refilled together)."""
        n = embeds.shape[0]
        if self.length + n > self.max_len:
            raise M4Error(f"context full: {self.length} + {n} tokens exceed its {self.max_len}")
        out = self.backend.forward(embeds, self.length, self.cache, greedy=greedy)
        self.segments += [Segment(kind, k) for k in (lengths or [n])]
        self.length += n
        return out if greedy else out[-1]

    def shift_out(self, index: int) -> None:
        """Approximate eviction: drop segment `index` by moving the later ones down in the
        cache with their keys re-rotated to the new positions. The kept tokens still carry
        what they saw of the dropped one, so answers can differ from a fresh prefill."""
        start = sum(s.length for s in self.segments[:index])
        gone = self.segments.pop(index).length
        self.backend.shift(self.cache, start + gone, self.length, gone)
        self.length -= gone

    def mark(self) -> int:
        return len(self.segments)

    def rollback(self, mark: int) -> None:
        del self.segments[mark:]
        self.length = sum(s.length for s in self.segments)

    def generate(self, logits: np.ndarray | int, max_new_tokens: int, stop_ids: set[int],
                 sampling: Sampling = Sampling(), stats: dict | None = None,
                 started: float | None = None) -> Iterator[int]:
        """Token ids of the answer to what the context holds, one decode step each, from the
        last prefill's logits or (greedy) its token; the
        answer is kept in the cache as a segment (roll back to drop it). `stats` receives
        ttft_ms (counted from `started`), decode_tok_s and new_tokens."""
        stats = {} if stats is None else stats
        started = time.perf_counter() if started is None else started
        rng = np.random.default_rng(sampling.seed)
        count = 0
        for i in range(max_new_tokens):
            token = logits if isinstance(logits, int) else sample(logits, sampling, rng)
            if token in stop_ids:
                break
            if count == 0:
                first = time.perf_counter()
                stats["ttft_ms"] = (first - started) * 1e3
            count += 1
            yield token
            if i + 1 < max_new_tokens:  # the last token needs no forward pass
                logits = self.append("answer", self.backend.embed_tokens([token]), greedy=sampling.greedy)
        stats["new_tokens"] = count
        if count > 1:
            stats["decode_tok_s"] = (count - 1) / (time.perf_counter() - first)
