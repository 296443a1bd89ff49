"""The ONNX Runtime backend: a bundle run with onnxruntime and numpy only (no torch).

The cache is two preallocated numpy arrays per context, indexed by position, so a context
may roll back or re-prefill from any earlier position. Which decoder runs decides their
layout:

- decoder_ort.onnx (ONNX Runtime's fused contrib ops; on the CPU, where the bundle has it):
  keys and values (layers, kv, max_len, D). Each layer's buffer is bound as both the past
  input and the present output of its GroupQueryAttention, which reads rows [0, pos) and
  writes the new rows in place: no step copies the cache, and attention costs the filled
  length, not max_len. Every forward is an IO binding; a decode step's is made once.
- decoder.onnx (standard ops; other providers, older bundles): keys transposed
  (layers, kv, D, max_len), values (layers, kv, max_len, D). The graph (m4/export/graphs.py)
  reads each layer's slice where it lies and returns only the new positions' keys and
  values, which are written in at [pos, pos + T). A decode step attends over the whole
  buffer (masked past the filled length), so contexts size their cache to what they will
  hold. Prefill chunks attend over a compact copy of the filled prefix (their attention then
  costs the prefix, not max_len; a prefill is compute-bound, the copy small beside it) or,
  for a few tokens after a long history, over the buffer as it is.

Prefill runs in chunks of PREFILL_CHUNK tokens (m4.bundle_format).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from m4.bundle_format import ORT_DECODER, past_names, present_names
from m4.errors import M4Error
from m4.model.rope import rope_table, rotate
from m4.runtime.bundle_backend import BundleBackend

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
    """One forward's IO binding over a cache: the caller writes the input rows and past_len
    into the bound arrays and runs; logits land in a bound array, and the new keys and
    values in bound arrays (decoder.onnx) or in the cache itself (decoder_ort.onnx).
    A decode step's is made once per cache and reused: nothing is re-bound or allocated."""

    def __init__(self, decoder: ort.InferenceSession, cache: OrtCache, t: int, index: np.ndarray, hidden: int,
                 vocab: int):
        k, v = cache.k, cache.v
        self.rows = np.zeros((1, t, hidden), k.dtype)
        self.past_len = np.zeros((), np.int64)
        self.index = index.astype(np.int64)  # which positions get logits
        self.logits = np.zeros((1, len(index), vocab), k.dtype)
        self.binding = b = decoder.io_binding()
        for name, a in (("inputs_embeds", self.rows), ("past_len", self.past_len), ("logits_index", self.index)):
            bind(b, name, a)
        bind(b, "logits", self.logits, output=True)
        layers = list(layer_views(k, v))
        for name, a in zip(past_names(len(k)), layers):
            bind(b, name, a)
        if cache.transposed:
            self.new_k = np.zeros(k.shape[:3] + (t,), k.dtype)
            self.new_v = np.zeros(v.shape[:2] + (t,) + v.shape[3:], v.dtype)
            bind(b, "new_keys", self.new_k, output=True)
            bind(b, "new_values", self.new_v, output=True)
        else:
            for name, a in zip(present_names(len(k)), layers):
                bind(b, name, a, output=True)


def layer_views(k: np.ndarray, v: np.ndarray):
    """Each layer's key then value array as the graph's (1, ...) inputs (views, no copies)."""
    for i in range(len(k)):
        yield k[i][None]
        yield v[i][None]


@dataclass
class OrtCache:
    k: np.ndarray  # (layers, kv_heads, max_len, head_dim), or (layers, kv_heads, head_dim, max_len) if transposed
    v: np.ndarray  # (layers, kv_heads, max_len, head_dim)
    transposed: bool  # keys laid out for decoder.onnx
    step: Bound | None = None  # made on the first decode step

    @property
    def max_len(self) -> int:
        return self.v.shape[2]

    @property
    def keys(self) -> np.ndarray:
        """The keys as (layers, kv_heads, max_len, head_dim), a view in either layout."""
        return self.k.swapaxes(2, 3) if self.transposed else self.k

    def write(self, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """decoder.onnx's new keys (layers, kv, D, T) and values into rows [pos, pos + T)."""
        self.k[..., pos:pos + k.shape[3]] = k
        self.v[:, :, pos:pos + v.shape[2]] = v


class OnnxBackend(BundleBackend):
    name = "onnx"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None):
        path = Path(path)
        super().__init__(path)
        chosen = providers(device)
        self.vision = session(path / "vision.onnx", chosen, threads)
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

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 pixels -> (n, tokens_per_image, H) embeddings."""
        return self.vision.run(None, {"pixel_values": pixels.astype(self.dtype)})[0]

    def new_cache(self, max_len: int) -> OrtCache:
        a = self.arch.text
        self.check_positions(max_len)
        shape = (a.layers, a.kv_heads, max_len, a.head_dim)
        keys = shape if self.fused else (a.layers, a.kv_heads, a.head_dim, max_len)
        return OrtCache(np.zeros(keys, self.dtype), np.zeros(shape, self.dtype), transposed=not self.fused)

    def logits(self, embeds: np.ndarray, pos: int, cache: OrtCache, last_only: bool = True) -> np.ndarray:
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
        return self.chunked(embeds, pos, last_only, lambda piece, at, keep: self.prefill(piece, at, cache, keep))

    def bound(self, cache: OrtCache, t: int, index: np.ndarray) -> Bound:
        return Bound(self.decoder, cache, t, index, self.arch.text.hidden, self.arch.text.vocab)

    def run(self, s: Bound, embeds: np.ndarray, pos: int, cache: OrtCache) -> np.ndarray:
        s.rows[0] = embeds
        s.past_len[...] = pos
        self.decoder.run_with_iobinding(s.binding)
        if cache.transposed:
            cache.write(pos, s.new_k, s.new_v)
        return s.logits[0].astype(np.float32)

    def prefill(self, embeds: np.ndarray, pos: int, cache: OrtCache, keep: np.ndarray) -> np.ndarray:
        """decoder.onnx over a compact copy of [0, pos), or over the whole buffer where its
        unfilled tail costs less than that copy (roughly: an unfilled position costs each
        query a score, a filled one a copy of its keys and values): a short question after a
        long history takes the buffer as it is."""
        if embeds.shape[0] * (cache.max_len - pos) <= 16 * pos:
            past = layer_views(cache.k, cache.v)
        else:
            past = layer_views(np.ascontiguousarray(cache.k[..., :pos]), np.ascontiguousarray(cache.v[:, :, :pos]))
        feed = {"inputs_embeds": embeds[None].astype(self.dtype), "past_len": np.array(pos, np.int64),
                "logits_index": keep.astype(np.int64), **dict(zip(self.past, past))}
        logits, k, v = self.decoder.run(None, feed)
        cache.write(pos, k, v)
        return logits[0].astype(np.float32)

    def shift(self, cache: OrtCache, start: int, end: int, by: int) -> None:
        """Move cached positions [start, end) to [start - by, end - by), keys rotated by -by
        (RoPE composes), as TorchBackend.shift does: approximate eviction for live contexts."""
        cos, sin = rope_table(self.arch.text, [-by])
        keys = cache.keys
        # a float32 copy: source and target overlap
        keys[:, :, start - by:end - by] = rotate(keys[:, :, start:end].astype(np.float32), cos[0], sin[0])
        cache.v[:, :, start - by:end - by] = cache.v[:, :, start:end].copy()
