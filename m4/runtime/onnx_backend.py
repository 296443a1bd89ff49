"""The ONNX Runtime backend: a bundle run with onnxruntime and numpy only (no torch).

The cache is two preallocated numpy arrays per context, keys (layers, kv, D, max_len)
and values (layers, kv, max_len, D), indexed by position, so a context may roll back or
re-prefill from any earlier position. The decoder graph (m4/export/graphs.py) reads each
layer's slice of them where it lies and returns only the new positions' keys and values,
which are written in at [pos, pos + T): a decode step copies one position per layer,
never the cache. Decode steps reuse one IO binding per cache, bound once to the cache, an
input row and the output arrays. A decode step attends over the whole buffer (masked past
the filled length), so contexts size their cache to what they will hold.

Prefill runs in chunks of PREFILL_CHUNK tokens, which bounds the attention scores the
graph materialises, each chunk against a compact copy of the filled prefix (its attention
then costs the prefix, not max_len; a prefill is compute-bound, the copy small beside it)
or, for a few tokens after a long history, against the buffer as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from m4.errors import M4Error
from m4.export.manifest import DTYPES, manifest_arch, past_names, read_manifest
from m4.model.config import TextArch

PREFILL_CHUNK = 512
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


def session(f: Path, device: str, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about harmless things on every load
    if threads:
        opts.intra_op_num_threads = threads
    chosen = providers(device)
    try:
        return ort.InferenceSession(str(f), opts, providers=chosen)
    except Exception as e:  # ORT raises its own types for unparsable or invalid graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise M4Error(f"cannot load {f}: {first}") from None


def rope(a: TextArch, position: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of one position's RoPE angles, (head_dim,) float32, as
    m4.model.qwen2.rope_table computes them (which needs torch)."""
    inv_freq = 1.0 / np.float32(a.rope_theta) ** (np.arange(0, a.head_dim, 2, dtype=np.float32) / a.head_dim)
    angles = np.tile(np.float32(position) * inv_freq.astype(np.float32), 2)
    return np.cos(angles), np.sin(angles)


def bind(b: ort.IOBinding, name: str, a: np.ndarray, output: bool = False) -> None:
    """Bind a contiguous array by pointer: ORT reads (or writes) it in place."""
    (b.bind_output if output else b.bind_input)(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)


class DecodeStep:
    """A decode step's IO binding, bound once per cache: a step writes its input row and
    position into the bound arrays and runs; nothing is re-bound or allocated."""

    def __init__(self, decoder: ort.InferenceSession, cache: OrtCache, hidden: int, vocab: int):
        k, v = cache.k, cache.v
        self.row = np.zeros((1, 1, hidden), k.dtype)
        self.past_len = np.zeros((), np.int64)
        self.index = np.zeros(1, np.int64)  # logits of the one position
        self.logits = np.zeros((1, 1, vocab), k.dtype)
        self.new_k = np.zeros(k.shape[:3] + (1,), k.dtype)
        self.new_v = np.zeros(v.shape[:2] + (1,) + v.shape[3:], v.dtype)
        self.binding = b = decoder.io_binding()
        for name, a in (("inputs_embeds", self.row), ("past_len", self.past_len), ("logits_index", self.index)):
            bind(b, name, a)
        for name, a in zip(past_names(len(k)), layer_views(k, v)):
            bind(b, name, a)
        for name, a in (("logits", self.logits), ("new_keys", self.new_k), ("new_values", self.new_v)):
            bind(b, name, a, output=True)


def layer_views(k: np.ndarray, v: np.ndarray):
    """Each layer's key then value array as the graph's (1, ...) inputs (views, no copies)."""
    for i in range(len(k)):
        yield k[i][None]
        yield v[i][None]


@dataclass
class OrtCache:
    k: np.ndarray  # (layers, kv_heads, head_dim, max_len): keys transposed
    v: np.ndarray  # (layers, kv_heads, max_len, head_dim)
    step: DecodeStep | None = None  # made on the first decode step

    @property
    def max_len(self) -> int:
        return self.v.shape[2]

    def write(self, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        self.k[..., pos:pos + k.shape[3]] = k
        self.v[:, :, pos:pos + v.shape[2]] = v


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None):
        path = Path(path)
        self.manifest = read_manifest(path)
        self.arch = manifest_arch(self.manifest)
        self.dtype = np.dtype(DTYPES[self.manifest["dtype"]])
        self.vision = session(path / "vision.onnx", device, threads)
        self.decoder = session(path / "decoder.onnx", device, threads)
        outputs = [o.name for o in self.decoder.get_outputs()]
        if outputs != ["logits", "new_keys", "new_values"]:
            raise M4Error(f"{path / 'decoder.onnx'} has outputs {outputs}, not the ones this m4 runs: "
                          "re-export the bundle")
        # memory-mapped: a 150k-row table costs only the rows a prompt looks up
        self.table = np.load(path / "embed_tokens.npy", mmap_mode="r")
        self.past = past_names(self.arch.text.layers)
        self.chunk = PREFILL_CHUNK

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 pixels -> (n, tokens_per_image, H) embeddings."""
        return self.vision.run(None, {"pixel_values": pixels.astype(self.dtype)})[0]

    def embed_tokens(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self.table[ids], dtype=self.dtype)

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)

    def new_cache(self, max_len: int) -> OrtCache:
        a = self.arch.text
        if max_len > a.max_positions:
            raise M4Error(f"a context of {max_len} tokens exceeds the model's {a.max_positions} positions")
        return OrtCache(np.zeros((a.layers, a.kv_heads, a.head_dim, max_len), self.dtype),
                        np.zeros((a.layers, a.kv_heads, max_len, a.head_dim), self.dtype))

    def forward(self, embeds: np.ndarray, pos: int, cache: OrtCache, last_only: bool = True) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T) -> float32 logits (T or 1, vocab)."""
        t = embeds.shape[0]
        if pos + t > cache.max_len:
            raise M4Error(f"positions {pos}..{pos + t} exceed the cache's {cache.max_len}")
        if t == 1:
            return self.step(embeds, pos, cache)
        out = []
        for s in range(0, t, self.chunk):
            chunk = embeds[s:s + self.chunk]
            last = s + self.chunk >= t
            # the graph returns at least one row of logits: a non-final chunk's is dropped
            keep = np.arange(len(chunk)) if not last_only else np.array([len(chunk) - 1])
            logits = self.prefill(chunk, pos + s, cache, keep)
            if last or not last_only:
                out.append(logits)
        return np.concatenate(out)

    def prefill(self, embeds: np.ndarray, pos: int, cache: OrtCache, keep: np.ndarray) -> np.ndarray:
        # Attend over a compact copy of [0, pos), or over the whole buffer where its unfilled
        # tail costs less than that copy (roughly: an unfilled position costs each query a
        # score, a filled one a copy of its keys and values): a short question after a
        # long history takes the buffer as it is.
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
        cos, sin = rope(self.arch.text, by)
        k = cache.k[..., start:end].astype(np.float32)  # a copy: source and target overlap
        half = len(cos) // 2
        rotated = np.concatenate([-k[:, :, half:], k[:, :, :half]], axis=2)
        cache.k[..., start - by:end - by] = k * cos[:, None] - rotated * sin[:, None]
        cache.v[:, :, start - by:end - by] = cache.v[:, :, start:end].copy()

    def step(self, embeds: np.ndarray, pos: int, cache: OrtCache) -> np.ndarray:
        if cache.step is None:
            cache.step = DecodeStep(self.decoder, cache, self.arch.text.hidden, self.arch.text.vocab)
        s = cache.step
        s.row[...] = embeds
        s.past_len[...] = pos
        self.decoder.run_with_iobinding(s.binding)
        cache.write(pos, s.new_k, s.new_v)
        return s.logits[0].astype(np.float32)
