"""The ONNX Runtime backend: a bundle run with onnxruntime and numpy only (no torch).

A context's cache is two preallocated numpy arrays, indexed by position, so a context may
roll back or re-prefill from any earlier position; caches of one size are slots of a page
(`Page`), so that a decode step of several contexts runs as one batch. Which decoder runs
decides their layout:

- decoder_ort.onnx (ONNX Runtime's fused contrib ops; on the CPU, where the bundle has it):
  keys and values (layers, kv, max_len, D). Each layer's buffer is bound as both the past
  input and the present output of its GroupQueryAttention, which reads rows [0, pos) and
  writes the new rows in place: no step copies the cache, and attention costs the filled
  length, not max_len. Every forward is an IO binding; a decode step's is made once.
- decoder.onnx (standard ops; other providers, head sizes the fused kernel refuses): keys
  transposed (layers, kv, D, max_len), values (layers, kv, max_len, D). The graph
  (m4/export/graphs.py) reads each layer's slice where it lies and returns only the new positions' keys and
  values, which are written in at [pos, pos + T). A decode step attends over the whole
  buffer (masked past the filled length), so contexts size their cache to what they will
  hold. Prefill chunks attend over a compact copy of the filled prefix (their attention then
  costs the prefix, not max_len; a prefill is compute-bound, the copy small beside it) or,
  for a few tokens after a long history, over the buffer as it is.

Prefill runs in chunks of PREFILL_CHUNK tokens (m4.bundle_format).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from m4.bundle_format import ORT_DECODER, past_names, present_names
from m4.errors import M4Error
from m4.model.rope import rope_table, rotate
from m4.runtime.backend import bucketed
from m4.runtime.bundle_backend import BundleBackend

SLOTS = 8  # contexts of one cache size that can decode in one batched step

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device not in PROVIDERS:
        raise M4Error(f"unknown device {device!r} for ONNX Runtime: use cpu, cuda, tensorrt or auto")
    if PROVIDERS[device][0] not in available:
        raise M4Error(f"device {device}: this onnxruntime has no {PROVIDERS[device][0]} "
                      f"(it has {', '.join(available)}); install onnxruntime-gpu")
    return PROVIDERS[device]


def session(f: Path, chosen: list[str], threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about harmless things on every load
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(f), opts, providers=chosen)
    except Exception as e:  # ORT raises its own types for unparsable or invalid graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise M4Error(f"cannot load {f}: {first}") from None


def bind(b: ort.IOBinding, name: str, a: np.ndarray, output: bool = False) -> None:
    """Bind a contiguous array by pointer: ORT reads (or writes) it in place."""
    (b.bind_output if output else b.bind_input)(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)


class Bound:
    """One forward's IO binding over caches: the caller writes the input rows and past_len
    into the bound arrays and runs; logits land in a bound array, and the new keys and
    values in bound arrays (decoder.onnx) or in the caches themselves (decoder_ort.onnx).
    A decode step's is made once per cache (or page and batch size) and reused: nothing is
    re-bound or allocated. `layers`: each layer's keys then values, (B, ...) arrays."""

    def __init__(self, decoder: ort.InferenceSession, layers: list[np.ndarray], transposed: bool, t: int,
                 index: np.ndarray, hidden: int, vocab: int):
        b, dtype = layers[0].shape[0], layers[0].dtype
        self.rows = np.zeros((b, t, hidden), dtype)
        self.past_len = np.zeros((b,), np.int64)
        self.index = index.astype(np.int64)  # which positions get logits
        self.logits = np.zeros((b, len(index), vocab), dtype)
        self.binding = bound = decoder.io_binding()
        for name, a in (("inputs_embeds", self.rows), ("past_len", self.past_len), ("logits_index", self.index)):
            bind(bound, name, a)
        bind(bound, "logits", self.logits, output=True)
        for name, a in zip(past_names(len(layers) // 2), layers):
            bind(bound, name, a)
        if transposed:  # decoder.onnx: the new positions' keys and values, (layers, B, ...)
            k, v, n = layers[0], layers[1], len(layers) // 2
            self.new_k = np.zeros((n, b, k.shape[1], k.shape[2], t), dtype)
            self.new_v = np.zeros((n, b, v.shape[1], t, v.shape[3]), dtype)
            bind(bound, "new_keys", self.new_k, output=True)
            bind(bound, "new_values", self.new_v, output=True)
        else:
            for name, a in zip(present_names(len(layers) // 2), layers):
                bind(bound, name, a, output=True)


def layer_views(k: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Each layer's key then value array as the graph's (1, ...) inputs (views, no copies)."""
    return [a[i][None] for i in range(len(k)) for a in (k, v)]


class Page:
    """SLOTS caches of one size, laid out one after another so that the first n slots are one
    (n, kv, size + 1, D) array per layer (keys (n, kv, D, size + 1) for decoder.onnx): the
    batch a decode step binds. A context's cache is a slot; a step binds slots [0, n) for its
    rows' highest slot n - 1, and a slot in that range whose context is not in the step runs
    a dummy row at its slot's spare last position (`size`), which no context reads
    (decoder_ort.onnx writes it there; decoder.onnx's new keys of such a row are not kept).
    Lowest free slots are taken first, which keeps the batches short. Zeroed lazily by the OS
    (calloc): a slot costs memory once written, to within a huge page at its edges."""

    def __init__(self, shape: tuple[int, int, int], size: int, dtype: np.dtype[Any], transposed: bool):
        layers, kv, d = shape
        self.size, self.transposed = size, transposed
        self.k = np.zeros((layers, SLOTS, kv, d, size + 1) if transposed else (layers, SLOTS, kv, size + 1, d), dtype)
        self.v = np.zeros((layers, SLOTS, kv, size + 1, d), dtype)
        self.free = list(range(SLOTS))
        self.steps: dict[int, Bound] = {}  # decode steps over slots [0, n), by n

    def take(self) -> OrtCache:
        s = self.free.pop(0)
        cache = OrtCache(self.k[:, s], self.v[:, s], self.transposed, page=self, slot=s)
        weakref.finalize(cache, self.release, s).atexit = False
        return cache

    def release(self, s: int) -> None:
        self.free.append(s)
        self.free.sort()

@dataclass
class OrtCache:
    k: np.ndarray  # (layers, kv_heads, max_len, head_dim), or (layers, kv_heads, head_dim, max_len) if transposed
    v: np.ndarray  # (layers, kv_heads, max_len, head_dim)
    transposed: bool  # keys laid out for decoder.onnx
    step: Bound | None = None  # made on the first decode step
    page: Page | None = None  # a pooled cache is slot `slot` of a page
    slot: int = 0

    @property
    def max_len(self) -> int:
        return self.page.size if self.page else self.v.shape[2]

    @property
    def keys(self) -> np.ndarray:
        """The keys as (layers, kv_heads, max_len, head_dim), a view in either layout."""
        return self.k.swapaxes(2, 3) if self.transposed else self.k

    def copy(self, n: int) -> OrtCache:
        """Its first n positions, in arrays of their own (in its layout)."""
        return OrtCache((self.k[..., :n] if self.transposed else self.k[:, :, :n]).copy(), self.v[:, :, :n].copy(),
                        self.transposed)

    def write(self, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """decoder.onnx's new keys (layers, kv, D, T) and values into rows [pos, pos + T)."""
        self.k[..., pos:pos + k.shape[3]] = k
        self.v[:, :, pos:pos + v.shape[2]] = v


class OnnxBackend(BundleBackend):
    name = "onnx"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, decoder: bool = True):
        """decoder=False: the vision graph and the embedding table alone, which embed prompts
        (calibration's, whose float decoder would outweigh all else it holds)."""
        path = Path(path)
        super().__init__(path)
        chosen = providers(device)
        self.vision = session(path / "vision.onnx", chosen, threads)
        if not decoder:
            return
        # the fused twin where it applies: ONNX Runtime's CPU kernels (a weight-only quantised
        # bundle's is quantised as its decoder.onnx is; a w8a8 bundle has none)
        self.fused = chosen[0] == "CPUExecutionProvider" and ORT_DECODER in self.manifest["files"]
        f = path / (ORT_DECODER if self.fused else "decoder.onnx")
        self.decoder = session(f, chosen, threads)
        layers = self.arch.text.layers
        expected = ["logits"] + present_names(layers) if self.fused else ["logits", "new_keys", "new_values"]
        outputs = [o.name for o in self.decoder.get_outputs()]
        if outputs != expected:
            raise M4Error(f"{f} has outputs {outputs[:3]}, not the ones this m4 runs: re-export the bundle")
        self.past = past_names(layers)
        self.pages: list[Page] = []

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 pixels -> (n, tokens_per_image, H) embeddings."""
        embeds: np.ndarray = self.vision.run(None, {"pixel_values": pixels.astype(self.dtype)})[0]
        return embeds

    def new_cache(self, max_len: int) -> OrtCache:
        """A slot of a page of caches (rounded up to CACHE_BUCKET positions, m4.runtime.backend)
        where contexts decode batched; a cache longer than the model's positions allow for the
        rounding has arrays of its own."""
        a = self.arch.text
        self.check_positions(max_len)
        size = min(bucketed(max_len), a.max_positions - 1)  # the spare needs an angle
        if max_len <= size:
            page = next((p for p in self.pages if p.size == size and p.free), None)
            if page is None:
                page = Page((a.layers, a.kv_heads, a.head_dim), size, self.dtype, transposed=not self.fused)
                self.pages.append(page)
            return page.take()
        shape = (a.layers, a.kv_heads, max_len, a.head_dim)
        keys = shape if self.fused else (a.layers, a.kv_heads, a.head_dim, max_len)
        return OrtCache(np.zeros(keys, self.dtype), np.zeros(shape, self.dtype), transposed=not self.fused)

    def logits(self, embeds: np.ndarray, pos: int, cache: OrtCache, last_only: bool) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T) -> float32 logits (T or 1, vocab)."""
        t = embeds.shape[0]
        if pos + t > cache.max_len:
            raise M4Error(f"positions {pos}..{pos + t} exceed the cache's {cache.max_len}")
        if t == 1:
            if cache.step is None:
                cache.step = self.bound(cache, 1, np.zeros(1))
            return self.run(cache.step, embeds, pos, cache)
        if self.fused:
            return self.chunked(embeds, pos, last_only,
                                lambda piece, at, keep: self.run(self.bound(cache, len(piece), keep), piece, at, cache))
        return self.chunked(embeds, pos, last_only, lambda piece, at, keep: self.standard_chunk(piece, at, cache, keep))

    def bound(self, cache: OrtCache, t: int, index: np.ndarray) -> Bound:
        return self.binding(layer_views(cache.k, cache.v), cache.transposed, t, index)

    def binding(self, layers: list[np.ndarray], transposed: bool, t: int, index: np.ndarray) -> Bound:
        return Bound(self.decoder, layers, transposed, t, index, self.arch.text.hidden, self.arch.text.vocab)

    def rows(self, embeds: np.ndarray, positions: list[int], caches: list[OrtCache]) -> np.ndarray:
        """One decode step of several contexts: row i's token (embeds[i], (H,)) at
        positions[i] of caches[i] -> float32 logits (B, vocab). The rows of one page run as
        one batch; a cache of its own runs alone."""
        out = np.zeros((len(caches), self.arch.text.vocab), np.float32)
        by_page: dict[int, list[int]] = {}
        for i, c in enumerate(caches):
            if c.page is None:
                out[i] = self.logits(embeds[i:i + 1], positions[i], c, True)[0]
            else:
                by_page.setdefault(id(c.page), []).append(i)
        for rows in by_page.values():
            page = caches[rows[0]].page
            assert page is not None
            n = max(caches[i].slot for i in rows) + 1
            if n not in page.steps:
                page.steps[n] = self.binding([a[i, :n] for i in range(len(page.k)) for a in (page.k, page.v)],
                                             page.transposed, 1, np.zeros(1))
            step = page.steps[n]
            step.past_len[:] = page.size  # slots not in this step write their spare position
            for i in rows:
                if positions[i] >= page.size:
                    raise M4Error(f"position {positions[i]} exceeds the cache's {page.size}")
                step.rows[caches[i].slot, 0] = embeds[i]
                step.past_len[caches[i].slot] = positions[i]
            self.decoder.run_with_iobinding(step.binding)
            for i in rows if page.transposed else ():  # decoder.onnx returned the new keys: into each slot
                caches[i].write(positions[i], step.new_k[:, caches[i].slot], step.new_v[:, caches[i].slot])
            out[rows] = step.logits[[caches[i].slot for i in rows], 0]
        return out

    def run(self, s: Bound, embeds: np.ndarray, pos: int, cache: OrtCache) -> np.ndarray:
        s.rows[0] = embeds
        s.past_len[...] = pos
        self.decoder.run_with_iobinding(s.binding)
        if cache.transposed:
            cache.write(pos, s.new_k[:, 0], s.new_v[:, 0])
        logits: np.ndarray = s.logits[0].astype(np.float32)
        return logits

    def standard_chunk(self, embeds: np.ndarray, pos: int, cache: OrtCache, keep: np.ndarray) -> np.ndarray:
        """decoder.onnx over a compact copy of [0, pos), or over the whole buffer where its
        unfilled tail costs less than that copy (roughly: an unfilled position costs each
        query a score, a filled one a copy of its keys and values): a short question after a
        long history takes the buffer as it is."""
        if embeds.shape[0] * (cache.max_len - pos) <= 16 * pos:
            past = layer_views(cache.k, cache.v)
        else:
            past = layer_views(np.ascontiguousarray(cache.k[..., :pos]), np.ascontiguousarray(cache.v[:, :, :pos]))
        feed = {"inputs_embeds": embeds[None].astype(self.dtype),
                "past_len": np.array([pos], np.int64),
                "logits_index": keep.astype(np.int64), **dict(zip(self.past, past))}
        logits, k, v = self.decoder.run(None, feed)
        cache.write(pos, k[:, 0], v[:, 0])
        out: np.ndarray = logits[0].astype(np.float32)
        return out

    def save_prefix(self, cache: OrtCache, n: int) -> OrtCache:
        return cache.copy(n)

    def load_prefix(self, cache: OrtCache, saved: OrtCache, n: int) -> None:
        cache.keys[:, :, :n] = saved.keys[:, :, :n]
        cache.v[:, :, :n] = saved.v[:, :, :n]

    def nbytes(self, x: np.ndarray | OrtCache) -> int:
        return x.k.nbytes + x.v.nbytes if isinstance(x, OrtCache) else x.nbytes

    def shift(self, cache: OrtCache, start: int, end: int, by: int) -> None:
        """Move cached positions [start, end) to [start - by, end - by), keys rotated by -by
        (RoPE composes), as TorchBackend.shift does: approximate eviction for live contexts."""
        cos, sin = rope_table(self.arch.text, np.array([-by]))
        keys = cache.keys
        # a float32 copy: source and target overlap
        keys[:, :, start - by:end - by] = rotate(keys[:, :, start:end].astype(np.float32), cos[0], sin[0])
        cache.v[:, :, start - by:end - by] = cache.v[:, :, start:end].copy()
