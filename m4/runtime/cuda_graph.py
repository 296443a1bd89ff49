"""Functions captured once in CUDA graphs over static input buffers, then replayed.

At batch 1 a decode step is a few hundred small kernels; launching them one by one from
Python costs more than running them. A graph launches them all at once. Inputs are copied
into the buffers the graph was captured over; the outputs are the graph's own buffers, so
they are cloned before the next replay can overwrite them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from m4.model.decoder import KVCache

Step = Callable[..., torch.Tensor]


class Graphed:
    def __init__(self, fn: Step, *example: torch.Tensor):
        """Warms `fn` up on a side stream (lazy initialisation cannot be captured), then
        captures it. The warm-up runs on the example inputs: it must be harmless to run
        `fn` on them (a decode step rewrites the same cache entries it will write anyway)."""
        self.inputs = [x.clone() for x in example]
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch leaves its constructor untyped
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the application (a camera reader, a robot's stack)
        # may keep using CUDA while this one captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor | int) -> torch.Tensor:
        """Python numbers are filled into their buffer on the device (no host copy)."""
        for buf, x in zip(self.inputs, args):
            if isinstance(x, torch.Tensor):
                buf.copy_(x)
            else:
                buf.fill_(x)
        self.graph.replay()
        return self.output.clone()


Key = tuple[tuple[int, ...], int]  # the caches' key buffers (data_ptr) and the tokens a row


class Graphs:
    """The graphs of static decoder steps, each captured over the caches it writes and its
    input shapes on first use and replayed after. A graph holds its activations, so few are
    kept: every cache's one-token step; per cache the `chunks` latest chunk lengths (a
    frame, a refilled window, ...); the `sets` latest sets of caches stepped together
    (contexts that answer together keep answering together, so a set recurs). `forget`
    drops a cache's graphs when its buffers go."""

    def __init__(self, chunks: int, sets: int):
        self.chunks, self.sets = chunks, sets
        self.graphs: dict[Key, Graphed] = {}
        self.seen: set[Key] = set()  # single caches and lengths prefilled so far

    @staticmethod
    def key(caches: list[KVCache], t: int) -> Key:
        return tuple(c.k.data_ptr() for c in caches), t

    def repeated(self, cache: KVCache, t: int) -> bool:
        """Whether this cache has taken a chunk of T tokens before (this one is noted)."""
        key = self.key([cache], t)
        seen = key in self.seen
        self.seen.add(key)
        return seen

    def run(self, fn: Step, caches: list[KVCache], *args: torch.Tensor | int) -> torch.Tensor:
        """fn(*args), replayed from the graph for these caches and args[0]'s tokens a row
        ((B, T, H) embeddings), captured now if there is none (numbers are captured as 0-d
        tensors on args[0]'s device)."""
        x = args[0]
        assert isinstance(x, torch.Tensor)
        key = self.key(caches, x.shape[1])
        if key not in self.graphs:
            self.evict_for(key)
            example = [a if isinstance(a, torch.Tensor) else torch.tensor(a, device=x.device) for a in args]
            self.graphs[key] = Graphed(fn, *example)
        return self.graphs[key](*args)

    def evict_for(self, key: Key) -> None:
        """Room for a new graph: the oldest of its kind goes where that kind is full."""
        ptrs, t = key
        if len(ptrs) > 1:
            kind = [k for k in self.graphs if len(k[0]) > 1]
            limit = self.sets
        elif t > 1:
            kind = [k for k in self.graphs if k[0] == ptrs and k[1] > 1]
            limit = self.chunks
        else:
            return
        if len(kind) >= limit:
            del self.graphs[kind[0]]

    def forget(self, cache: KVCache) -> None:
        """Every graph over this cache's buffers, and the lengths it has seen (the buffers
        are freed or handed to another context)."""
        ptr = cache.k.data_ptr()
        self.graphs = {k: g for k, g in self.graphs.items() if ptr not in k[0]}
        self.seen = {k for k in self.seen if ptr not in k[0]}

    def clear(self) -> None:
        self.graphs.clear()
