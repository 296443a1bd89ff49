"""The torch backend: the compact model on CPU or CUDA.

A backend does two things, encode images and run the decoder on embeddings against its
cache; everything above it (prompts, contexts, sampling) is backend-independent. Embeddings
and the runtime's logits stay in the backend's own arrays (here torch tensors on its
device): a greedy token is picked there, and only sampled rows come to the host.

On CUDA (in the spirit of gpt-fast) the same model runs fast: fp16 weights, or weight-only
INT8 decoder linears (dtype "int8"); decode steps with static shapes, captured in one CUDA
graph per cache and replayed per token; a single frame's vision captured in a graph too (a
live frame is launch-bound; a batch keeps the GPU busy while Python launches, and each graph
would hold its own activations); prefill in chunks of TORCH_PREFILL_CHUNK tokens, and a chunk
length seen before on a cache (a live frame's tokens, the frames re-prefilled after an
eviction) through a static step and its graph like a token's: eager, such a chunk is
launch-bound too, while a one-off prompt would not repay a capture.

With static steps, caches are sized up to a multiple of CACHE_BUCKET (m4.runtime.backend)
and a released one is kept (SPARE_CACHES of them, with their graphs) for the next context of
its size: `ask` makes a context per question, and capturing a graph for each would cost
more than decoding.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from m4.errors import M4Error
from m4.model.checkpoint import load_model
from m4.model.config import Arch
from m4.model.decoder import KVCache, Rows, rotate
from m4.model.int8 import quantise_decoder
from m4.runtime.backend import bucketed
from m4.runtime.cuda_graph import Graphed, Graphs

# Torch's own bound on a prefill's activations (a window of frames); the bundle backends
# chunk by the bundle format's PREFILL_CHUNK, which their engines' profiles are built for.
TORCH_PREFILL_CHUNK = 2048
SPARE_CACHES = 2
CHUNK_GRAPHS = 4  # graphs of prefill chunks kept per cache (a frame, a refilled window, ...)
ROW_GRAPHS = 8  # graphs of batched decode steps kept, one per set of contexts
DECODE_MODES = ("eager", "static", "graph")


def column_major(text: torch.nn.Module) -> None:
    """The decoder's linear weights stored transposed, each input feature's column in one
    run, and seen by the modules as the same (out, in) matrices: torch's CPU matrix-vector
    and small-batch products read that layout faster (the 0.5b decoder's head: about a
    third less time a decode step on the machine of docs/performance.md). A tied embedding
    table keeps sharing the head's tensor."""
    moved: dict[int, torch.nn.Parameter] = {}
    for module in text.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            w = module.weight
            if id(w) not in moved:
                moved[id(w)] = torch.nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
            module.weight = moved[id(w)]


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TorchBackend:
    name = "torch"

    def __init__(self, path: Path, arch: Arch, device: str = "cpu", dtype: str | None = None,
                 decode: str | None = None):
        """dtype: a torch dtype name, or "int8" (decoder linears in int8, the rest float16 on
        CUDA, float32 on CPU). decode: "eager" (the default on CPU: attention reads only the
        filled part of the cache), "static" (the graph's step run eagerly: what a CUDA graph
        replays, testable on CPU) or "graph" (the default on CUDA)."""
        self.device = pick_device(device)
        cuda = self.device.startswith("cuda")
        self.quantisation = "int8" if dtype == "int8" else None
        float_dtype = None if dtype in (None, "int8") else dtype
        self.dtype = getattr(torch, float_dtype) if float_dtype else (torch.float16 if cuda else torch.float32)
        self.mode = decode or ("graph" if cuda else "eager")
        if self.mode not in DECODE_MODES or (self.mode == "graph" and not cuda):
            raise M4Error(f"decode mode {self.mode!r} is not one of {', '.join(DECODE_MODES)} on {self.device}")
        self.arch = arch
        self.model = load_model(path, arch, self.dtype, self.device)
        if self.quantisation:
            quantise_decoder(self.model.text)
        elif self.device == "cpu":
            column_major(self.model.text)
        self.decoder: Callable[..., torch.Tensor] = self.model.text  # what a static step runs (see compile)
        self.frame_graph: Graphed | None = None
        self.graphs = Graphs(CHUNK_GRAPHS, ROW_GRAPHS)  # static steps (captured only in "graph" mode)
        self.spare: list[KVCache] = []

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        """(n, 3, S, S) float32 pixels -> (n, tokens_per_image, H) embeddings."""
        x = torch.from_numpy(pixels).to(self.device, self.dtype)
        if self.mode == "graph" and x.shape[0] == 1:
            if self.frame_graph is None:
                self.frame_graph = Graphed(self.model.encode_images, x)
            out = self.frame_graph(x)
        else:
            out = self.model.encode_images(x)
        if self.device.startswith("cuda"):  # the caller's clock (stats, benchmarks) then measures the encoding
            torch.cuda.synchronize(self.device)
        return out

    @torch.inference_mode()
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, device=self.device))

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)

    def new_cache(self, max_len: int) -> KVCache:
        if self.mode == "eager":
            return KVCache.empty(self.arch.text, max_len, self.dtype, self.device)
        size = bucketed(max_len)
        i = next((i for i, c in enumerate(self.spare) if c.max_len == size), None)
        buffers = self.spare.pop(i) if i is not None else KVCache.empty(self.arch.text, size, self.dtype, self.device)
        cache = KVCache(buffers.k, buffers.v)
        weakref.finalize(cache, self._release, buffers).atexit = False  # nothing to keep at exit
        return cache

    def _release(self, buffers: KVCache) -> None:
        """A context let its cache go: keep it for the next one (stale entries are masked)."""
        self.spare.append(buffers)
        if len(self.spare) > SPARE_CACHES:
            self.graphs.forget(self.spare.pop(0))

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T) -> float32 logits (T or 1, vocab) on
        the host."""
        return self.host(self.logits(embeds, pos, cache, last_only)[0])

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Embeddings (T, H) at positions [pos, pos + T) -> the last position's logits
        (1, vocab) on the device."""
        return self.logits(embeds, pos, cache, last_only=True)[0]

    @torch.inference_mode()
    def decode(self, embeds: torch.Tensor, positions: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One decode step of any number of contexts: row i's token (embeds[i], (H,)) at
        positions[i] of caches[i] -> logits (B, vocab) on the device. One row is its
        context's step (on CUDA, its cache's graph); several, one pass over the weights for
        all rows: eager, attention reads each context's filled cache; with static steps,
        each whole cache under its mask, so that the step for one set of contexts replays
        from one CUDA graph at any positions."""
        if len(caches) == 1:
            return self.prefill(embeds, positions[0], caches[0])
        x = embeds[:, None]
        input_pos = torch.tensor(positions, device=self.device)[:, None]
        rows = Rows([c.prefix(p + 1) for c, p in zip(caches, positions)] if self.mode == "eager" else caches)

        def run(x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.model.text(x, input_pos, rows)[:, 0]
            return logits

        return self.graphs.run(run, caches, x, input_pos) if self.mode == "graph" else run(x, input_pos)

    def mask(self, logits: torch.Tensor, rows: list[int], allowed: np.ndarray) -> torch.Tensor:
        """On the device (the mask goes there, the logits stay), into a copy: a CUDA graph's
        logits are its output buffer."""
        keep = torch.from_numpy(allowed).to(logits.device, non_blocking=True)
        out = logits.clone()
        out[rows] = logits[rows].masked_fill(~keep, float("-inf"))
        return out

    def host(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy()

    def save_prefix(self, cache: KVCache, n: int) -> KVCache:
        return KVCache(cache.k[:, :, :, :n].clone(), cache.v[:, :, :, :n].clone())

    @torch.inference_mode()
    def load_prefix(self, cache: KVCache, saved: KVCache, n: int) -> None:
        cache.k[:, :, :, :n] = saved.k[:, :, :, :n]
        cache.v[:, :, :, :n] = saved.v[:, :, :, :n]

    def nbytes(self, x: torch.Tensor | KVCache) -> int:
        return x.k.nbytes + x.v.nbytes if isinstance(x, KVCache) else x.nbytes

    def logits(self, embeds: torch.Tensor, pos: int, cache: KVCache, last_only: bool) -> torch.Tensor:
        """Embeddings (T, H) at positions [pos, pos + T) -> logits (1, T or 1, vocab) on the
        device: a static step where one serves, else eager chunks."""
        t = embeds.shape[0]
        if self.mode != "eager" and last_only and self.repeated(cache, t):
            return self.step(embeds[None], pos, cache)
        chunks = [self.run(embeds[None, i:i + TORCH_PREFILL_CHUNK], pos + i, cache, last_only)
                  for i in range(0, t, TORCH_PREFILL_CHUNK)]
        return chunks[-1] if last_only else torch.cat(chunks, dim=1)

    def run(self, x: torch.Tensor, pos: int, cache: KVCache, last_only: bool) -> torch.Tensor:
        """T tokens eagerly; attention reads only the cache's filled part, [0, pos + T)."""
        t = x.shape[1]
        input_pos = torch.arange(pos, pos + t, device=self.device)
        last = torch.tensor([t - 1], device=self.device) if last_only else None
        out: torch.Tensor = self.model.text(x, input_pos, cache.prefix(pos + t), last)
        return out

    def compile(self) -> None:
        """Static decode steps through torch.compile (Inductor fuses the norms, RoPE and the
        other small kernels of a step; the graph then replays the fused kernels). The first
        step compiles, which takes a while; one compile serves every cache size. Batched
        steps run the plain model."""
        self.decoder = torch.compile(self.model.text, fullgraph=True, dynamic=True)
        self.graphs.clear()

    def repeated(self, cache: KVCache, t: int) -> bool:
        """Whether T tokens go through a static step: always one token, and a chunk whose
        length this cache has prefilled before."""
        if t == 1 or t > TORCH_PREFILL_CHUNK:
            return t == 1
        return self.graphs.repeated(cache, t)

    def step(self, x: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """T tokens with static shapes over the whole cache (the mask hides what is not
        filled): the graph captured for this cache and T replayed, or run eagerly. compile()
        serves the decode step; chunks run the plain model."""
        decoder = self.decoder if x.shape[1] == 1 else self.model.text

        def run(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
            # positions from a 0-d start, made inside the function: a captured graph must own
            # every tensor it reads (one made outside would be freed and its memory reused)
            steps = torch.arange(x.shape[1], device=x.device)
            out: torch.Tensor = decoder(x, start + steps, cache, steps[-1:])
            return out

        if self.mode == "static":
            return run(x, torch.tensor(pos, device=self.device))
        return self.graphs.run(run, [cache], x, pos)

    @torch.inference_mode()
    def shift(self, cache: KVCache, start: int, end: int, by: int) -> None:
        """Move cached positions [start, end) to [start - by, end - by); RoPE composes, so
        rotating the keys by -by puts them exactly where fresh keys would be."""
        cos, sin = (r[by].to(self.device, self.dtype) for r in (self.model.text.cos, self.model.text.sin))
        keys = cache.k[:, :, :, start:end].clone()  # source and target overlap
        cache.k[:, :, :, start - by:end - by] = rotate(keys, cos, -sin)
        cache.v[:, :, :, start - by:end - by] = cache.v[:, :, :, start:end].clone()
