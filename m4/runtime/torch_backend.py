"""The torch backend: the compact model on CPU or CUDA.

A backend does two things, encode images and run the decoder on embeddings against its
cache; everything above it (prompts, contexts, sampling) is backend-independent. Embeddings
stay in the backend's own arrays (here torch tensors on its device); logits come back as
numpy for the sampler.

On CUDA (in the spirit of gpt-fast) the same model runs fast: fp16 weights, or weight-only
INT8 decoder linears (dtype "int8"); decode steps with static shapes, captured in one CUDA
graph per cache and replayed per token; a single frame's vision captured in a graph too (a
live frame is launch-bound; a batch keeps the GPU busy while Python launches, and each graph
would hold its own activations); prefill in chunks of PREFILL_CHUNK tokens, and a chunk
length seen before on a cache (a live frame's tokens, the frames re-prefilled after an
eviction) through a static step and its graph like a token's: eager, such a chunk is
launch-bound too, while a one-off prompt would not repay a capture.

With static steps, caches are sized up to a multiple of CACHE_BUCKET and a released one is
kept (SPARE_CACHES of them, with their graphs) for the next context of its size: `ask`
makes a context per question, and capturing a graph for each would cost more than decoding.
"""

import weakref
from pathlib import Path

import numpy as np
import torch

from m4.errors import M4Error
from m4.model.checkpoint import load_model
from m4.model.config import Arch
from m4.model.int8 import quantise_decoder
from m4.model.decoder import KVCache, Rows, rotate
from m4.runtime.cuda_graph import Graphed

PREFILL_CHUNK = 2048  # bounds the activations of a long prefill (a window of frames)
CACHE_BUCKET = 256  # static steps read the whole buffer: rounding up costs at most this many masked tokens
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
        self.decoder = self.model.text  # what a static step runs (see compile)
        self.frame_graph: Graphed | None = None
        self.step_graphs: dict[tuple[int, int], Graphed] = {}  # static steps, by (data_ptr of the cache's keys, T)
        self.row_graphs: dict[tuple[int, ...], Graphed] = {}  # batched steps, by their caches' data_ptr
        self.seen: set[tuple[int, int]] = set()  # (cache, T) of the chunks prefilled so far
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
        size = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
        i = next((i for i, c in enumerate(self.spare) if c.max_len == size), None)
        buffers = self.spare.pop(i) if i is not None else KVCache.empty(self.arch.text, size, self.dtype, self.device)
        cache = KVCache(buffers.k, buffers.v)
        weakref.finalize(cache, self._release, buffers).atexit = False  # nothing to keep at exit
        return cache

    def _release(self, buffers: KVCache) -> None:
        """A context let its cache go: keep it for the next one (stale entries are masked)."""
        self.spare.append(buffers)
        if len(self.spare) > SPARE_CACHES:
            ptr = self.spare.pop(0).k.data_ptr()
            self.step_graphs = {k: g for k, g in self.step_graphs.items() if k[0] != ptr}
            self.row_graphs = {k: g for k, g in self.row_graphs.items() if ptr not in k}
            self.seen = {k for k in self.seen if k[0] != ptr}

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True,
                greedy: bool = False) -> np.ndarray | int:
        """Embeddings (T, H) at positions [pos, pos + T) -> float32 logits (T or 1, vocab) on
        the host; or, `greedy`, the id of the last position's most likely token, chosen on
        the device: the host then receives one number, not the vocabulary's logits."""
        t = embeds.shape[0]
        last_only = last_only or greedy
        if self.mode != "eager" and last_only and self.repeated(cache, t):
            logits = self.step(embeds[None], pos, cache)
        else:
            chunks = [self.run(embeds[None, i:i + PREFILL_CHUNK], pos + i, cache, last_only)
                      for i in range(0, t, PREFILL_CHUNK)]
            logits = chunks[-1] if last_only else torch.cat(chunks, dim=1)
        if greedy:
            return int(logits[0, -1].argmax())
        return logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, embeds: torch.Tensor, positions: list[int], caches: list[KVCache],
               greedy: bool = False) -> np.ndarray | list[int]:
        """One decode step of several contexts: row i's token (embeds[i], (H,)) at
        positions[i] of caches[i] -> float32 logits (B, vocab), or with `greedy` each row's
        most likely token, picked on the device. One pass over the weights for all rows;
        eager, attention reads each context's filled cache; with static steps, each whole
        cache under its mask, so that the step for one set of contexts replays from one
        CUDA graph at any positions."""
        input_pos = torch.tensor(positions, device=self.device)[:, None]
        if self.mode == "eager":
            rows = Rows([c.prefix(p + 1) for c, p in zip(caches, positions)])
            logits = self.model.text(embeds[:, None], input_pos, rows)[:, 0]
        else:
            logits = self.rows_step(embeds[:, None], input_pos, caches)
        return logits.argmax(-1).tolist() if greedy else logits.float().cpu().numpy()

    def rows_step(self, x: torch.Tensor, input_pos: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """The static batched step: run eagerly ("static"), or the graph captured for this
        set of caches replayed ("graph"; contexts that answer together keep answering
        together, so a set recurs; the oldest of ROW_GRAPHS sets goes)."""
        rows = Rows(caches)

        def run(x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
            return self.model.text(x, input_pos, rows)[:, 0]

        if self.mode == "static":
            return run(x, input_pos)
        key = tuple(c.k.data_ptr() for c in caches)
        if key not in self.row_graphs:
            if len(self.row_graphs) >= ROW_GRAPHS:  # each holds its activations
                del self.row_graphs[next(iter(self.row_graphs))]
            self.row_graphs[key] = Graphed(run, x, input_pos)
        return self.row_graphs[key](x, input_pos)

    def run(self, x: torch.Tensor, pos: int, cache: KVCache, last_only: bool) -> torch.Tensor:
        """T tokens eagerly; attention reads only the cache's filled part, [0, pos + T)."""
        t = x.shape[1]
        input_pos = torch.arange(pos, pos + t, device=self.device)
        last = torch.tensor([t - 1], device=self.device) if last_only else None
        return self.model.text(x, input_pos, cache.prefix(pos + t), last)

    def compile(self) -> None:
        """Static decode steps through torch.compile (Inductor fuses the norms, RoPE and the
        other small kernels of a step; the graph then replays the fused kernels). The first
        step compiles, which takes a while; one compile serves every cache size. Batched
        steps run the plain model."""
        self.decoder = torch.compile(self.model.text, fullgraph=True, dynamic=True)
        self.step_graphs.clear()

    def repeated(self, cache: KVCache, t: int) -> bool:
        """Whether T tokens go through a static step: always one token, and a chunk whose
        length this cache has prefilled before."""
        if t == 1 or t > PREFILL_CHUNK:
            return t == 1
        key = (cache.k.data_ptr(), t)
        seen = key in self.seen
        self.seen.add(key)
        return seen

    def step(self, x: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """T tokens with static shapes over the whole cache (the mask hides what is not
        filled): the graph captured for this cache and T replayed, or run eagerly. compile()
        serves the decode step; chunks run the plain model."""
        decoder = self.decoder if x.shape[1] == 1 else self.model.text

        def run(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
            # positions from a 0-d start, made inside the function: a captured graph must own
            # every tensor it reads (one made outside would be freed and its memory reused)
            steps = torch.arange(x.shape[1], device=x.device)
            return decoder(x, start + steps, cache, steps[-1:])

        if self.mode == "static":
            return run(x, torch.tensor(pos, device=self.device))
        key = (cache.k.data_ptr(), x.shape[1])
        if key not in self.step_graphs:  # captured on the first such step
            chunks = [k for k in self.step_graphs if k[0] == key[0] and k[1] > 1]
            if key[1] > 1 and len(chunks) >= CHUNK_GRAPHS:  # each holds its activations: the oldest goes
                del self.step_graphs[chunks[0]]
            self.step_graphs[key] = Graphed(run, x, torch.tensor(pos, device=self.device))
        return self.step_graphs[key](x, pos)

    @torch.inference_mode()
    def shift(self, cache: KVCache, start: int, end: int, by: int) -> None:
        """Move cached positions [start, end) to [start - by, end - by); RoPE composes, so
        rotating the keys by -by puts them exactly where fresh keys would be."""
        cos, sin = (r[by].to(self.device, self.dtype) for r in (self.model.text.cos, self.model.text.sin))
        keys = cache.k[:, :, :, start:end].clone()  # source and target overlap
        cache.k[:, :, :, start - by:end - by] = rotate(keys, cos, -sin)
        cache.v[:, :, :, start - by:end - by] = cache.v[:, :, :, start:end].clone()
