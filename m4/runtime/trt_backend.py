"""The TensorRT backend: a bundle's engines (`m4 build`) run with TensorRT's Python API
(10.3 on JetPack 6, and 11) and cuda-python; numpy only, no torch.

Engines: vision.plan (one profile: 1..max_images images) and decoder.plan, whose two
profiles, prefill (0: 1..chunk tokens) and decode (1: one token), each get an execution
context of their own, so alternating prefill and decode never re-selects a profile.

The KV cache lives on the GPU, two zeroed buffers per context laid out as decoder.onnx reads
them: keys transposed (layers, kv, D, M), values (layers, kv, M, D), M the context's size.
A forward binds each layer's slice by address; the graph reads the whole buffer (masked past
past_len, as the ONNX backend's decoder.onnx path does) and returns only the new positions'
keys and values, which two strided device-to-device copies (cudaMemcpy2DAsync) write in at
[pos, pos + T). What crosses between host and device: embeddings in, logits out, and the few
bytes of past_len and logits_index. A decode step copies no cache. A saved prefix
(m4.runtime.reuse) is a cache of its own length, copied out and in by the same strided copies.

Approximate eviction (shifting the cache) is not implemented: a live context over this
backend evicts exactly. Each execution context allocates TensorRT's default (static)
activation memory, sized for the largest profile: prefill and decode hold one each.

Experimental: nothing here has run on a GPU yet (tests/test_trt.py, which scripts/gpu_check.sh
runs where TensorRT is installed, is what a first run checks).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from m4.bundle_format import past_names, read_manifest
from m4.errors import M4Error
from m4.machine import TENSORRT_INSTALL, gpu_name
from m4.runtime.bundle_backend import BundleBackend

CUDA_PYTHON = "the trt backend needs cuda-python: pip install 'm4-vlm[trt]'"


def unavailable(path: Path, m: dict[str, Any] | None = None) -> str | None:
    """Why the bundle's engines cannot run here, or None. The order is the order of the fixes:
    no engines is said first, even where TensorRT is missing, since its fix (m4 build on this
    device) says in one line what to install when TensorRT is missing; engines built for
    another GPU next, since installing anything leaves them unusable; then what to install,
    naming the TensorRT version the engines want."""
    m = read_manifest(Path(path)) if m is None else m
    record = m.get("engines")
    if not record:
        return f"{path} has no TensorRT engines: build them on this device with m4 build {path}"
    here = gpu_name()
    if record["gpu"] != here:
        found = "no GPU that nvidia-smi or the Jetson device tree names" if here == "unknown" else here
        return (f"{path}'s engines were built for {record['gpu']} (TensorRT {record['tensorrt']}) and this machine "
                f"has {found}: rebuild them here with m4 build {path}")
    try:
        import tensorrt as trt
    except ImportError:
        return (f"the trt backend needs TensorRT's Python API, which is not installed here: {TENSORRT_INSTALL} "
                f"(the engines want TensorRT {record['tensorrt']})")
    if trt.__version__ != record["tensorrt"]:
        return (f"{path}'s engines were built with TensorRT {record['tensorrt']} and this machine has TensorRT "
                f"{trt.__version__} (an engine runs only on the version that built it): rebuild with m4 build {path}")
    try:
        cuda_runtime()
    except M4Error as e:
        return str(e)
    return None


def cuda_runtime() -> Any:
    """cuda-python's runtime API: cuda.bindings.runtime, or cuda.cudart before cuda-python 12.6."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise M4Error(CUDA_PYTHON) from None
    return runtime


class Cuda:
    """cuda-python's runtime calls, checked: each returns (error, results...)."""

    def __init__(self) -> None:
        self.rt = cuda_runtime()
        self.stream = self("cudaStreamCreate")
        self.handle = int(self.stream)  # what TensorRT takes

    def __call__(self, name: str, *args: Any) -> Any:
        err, *out = getattr(self.rt, name)(*args)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise M4Error(f"CUDA {name} failed: {err.name} ({self.rt.cudaGetErrorString(err)[1].decode()})")
        return out[0] if len(out) == 1 else None

    def upload(self, buf: DeviceBuffer, a: np.ndarray) -> None:
        """Host array into the front of `buf` (a pageable copy: the host may reuse `a` at return)."""
        a = np.ascontiguousarray(a, buf.dtype)
        self("cudaMemcpyAsync", buf.ptr, a.ctypes.data, a.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
             self.stream)

    def download(self, buf: DeviceBuffer, shape: tuple[int, ...]) -> np.ndarray:
        """The front of `buf` as a host array of `shape`, once the stream's work is done."""
        out = np.empty(tuple(shape), buf.dtype)
        self("cudaMemcpyAsync", out.ctypes.data, buf.ptr, out.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
             self.stream)
        self("cudaStreamSynchronize", self.stream)
        return out

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int) -> None:
        """`rows` rows of `width` bytes, `src_pitch` apart at `src`, to rows `dst_pitch` apart at `dst`."""
        self("cudaMemcpy2DAsync", dst, dst_pitch, src, src_pitch, width, rows,
             self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream)


class DeviceBuffer:
    """GPU memory for a C-contiguous array, zeroed (the decoder reads a cache buffer whole,
    masked: positions never written must hold finite numbers, or 0 * NaN spoils the
    output); freed when the object goes."""

    def __init__(self, cuda: Cuda, shape: tuple[int, ...], dtype: Any):
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = int(cuda("cudaMalloc", max(self.nbytes, 1)))
        weakref.finalize(self, cuda.rt.cudaFree, self.ptr)
        cuda("cudaMemsetAsync", self.ptr, 0, self.nbytes, cuda.stream)


class TrtCache:
    """One context's KV cache on the GPU (see the module's docstring for the layout)."""

    def __init__(self, cuda: Cuda, layers: int, kv: int, d: int, max_len: int, dtype: Any):
        self.k = DeviceBuffer(cuda, (layers, kv, d, max_len), dtype)
        self.v = DeviceBuffer(cuda, (layers, kv, max_len, d), dtype)

    @property
    def max_len(self) -> int:
        return self.v.shape[2]

    def tensors(self) -> Iterator[tuple[str, int, tuple[int, ...]]]:
        """decoder.onnx's cache inputs: (name, address, shape) of each layer's key and value."""
        layers, kv, d, m = self.k.shape
        step = kv * d * m * self.k.dtype.itemsize
        for name, i in zip(past_names(layers), range(2 * layers)):
            buf, shape = (self.k, (1, kv, d, m)) if i % 2 == 0 else (self.v, (1, kv, m, d))
            yield name, buf.ptr + i // 2 * step, shape

    def write(self, cuda: Cuda, pos: int, t: int, new_k: DeviceBuffer, new_v: DeviceBuffer) -> None:
        """The new keys (layers, kv, D, T) and values (layers, kv, T, D) into positions
        [pos, pos + T): one strided copy each, its rows (layer, head, dim) of T keys and
        (layer, head) of T*D values, not a copy per layer and head (at batch 1 a call from
        Python costs more than the bytes it moves)."""
        layers, kv, d, m = self.k.shape
        size = self.k.dtype.itemsize
        cuda.copy_rows(self.k.ptr + pos * size, m * size, new_k.ptr, t * size, t * size, layers * kv * d)
        cuda.copy_rows(self.v.ptr + pos * d * size, m * d * size, new_v.ptr, t * d * size, t * d * size, layers * kv)

    def copy_to(self, cuda: Cuda, dst: TrtCache, n: int) -> None:
        """Its first n positions into `dst`'s first n (caches of any sizes): one strided copy
        each for the keys and the values, as `write`."""
        layers, kv, d, m = self.k.shape
        size, to = self.k.dtype.itemsize, dst.max_len
        cuda.copy_rows(dst.k.ptr, to * size, self.k.ptr, m * size, n * size, layers * kv * d)
        cuda.copy_rows(dst.v.ptr, to * d * size, self.v.ptr, m * d * size, n * d * size, layers * kv)


class Profile:
    """An execution context of an engine on one optimisation profile, with device buffers
    for its IO tensors at the profile's largest shapes, except the `external` ones, which
    the caller binds (the cache)."""

    def __init__(self, trt: Any, cuda: Cuda, engine: Any, index: int, external: tuple[str, ...] = ()):
        self.cuda, self.context = cuda, engine.create_execution_context()
        self.context.set_optimization_profile_async(index, cuda.handle)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.shapes: dict[str, tuple[int, ...]] = {}
        for n in inputs:
            if -1 in tuple(engine.get_tensor_shape(n)):  # the largest shapes, so outputs take theirs
                self.shape(n, tuple(engine.get_tensor_profile_shape(n, index)[2]))
        self.buffers = {n: DeviceBuffer(cuda, self.context.get_tensor_shape(n),
                                        trt.nptype(engine.get_tensor_dtype(n))) for n in names if n not in external}
        for n, buf in self.buffers.items():
            self.context.set_tensor_address(n, buf.ptr)
        self.bound: Callable[[], TrtCache | None] = lambda: None  # the cache bound (a weak reference)

    def shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self.shapes.get(name) != shape:
            if not self.context.set_input_shape(name, shape):
                raise M4Error(f"{name} of shape {shape} is outside the engine's profile: rebuild it with m4 build "
                              "(--max-images, --max-context)")
            self.shapes[name] = shape

    def bind(self, cache: TrtCache) -> None:
        if self.bound() is not cache:
            for name, ptr, shape in cache.tensors():
                self.shape(name, shape)
                self.context.set_tensor_address(name, ptr)
            self.bound = weakref.ref(cache)

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.handle):
            raise M4Error("TensorRT could not run the engine (its log above says why)")


class TrtBackend(BundleBackend):
    name = "trt"

    def __init__(self, path: Path):
        path = Path(path)
        super().__init__(path)
        reason = unavailable(path, self.manifest)
        if reason:
            raise M4Error(reason)
        import tensorrt as trt

        self.cuda = Cuda()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {name: self.engine(path / "engines" / f"{name}.plan") for name in ("vision", "decoder")}
        vision, decoder = self.engines["vision"], self.engines["decoder"]
        self.vision = Profile(trt, self.cuda, vision, 0)
        self.max_images = tuple(vision.get_tensor_profile_shape("pixel_values", 0)[2])[0]
        past = tuple(past_names(self.arch.text.layers))
        self.prefilling, self.decoding = (Profile(trt, self.cuda, decoder, i, past) for i in (0, 1))
        self.chunk = tuple(decoder.get_tensor_profile_shape("inputs_embeds", 0)[2])[1]
        self.max_context = tuple(decoder.get_tensor_profile_shape(past[1], 1)[2])[2]
        embeds = np.dtype(trt.nptype(decoder.get_tensor_dtype("inputs_embeds")))
        if embeds != self.dtype:
            raise M4Error(f"{path}: the engines take {embeds} embeddings, the bundle holds {self.dtype}: "
                          f"rebuild them with m4 build {path}")

    def engine(self, f: Path) -> Any:
        engine = self.runtime.deserialize_cuda_engine(f.read_bytes())
        if engine is None:
            raise M4Error(f"TensorRT cannot load {f} (its log above says why): "
                          f"rebuild it with m4 build {f.parent.parent}")
        return engine

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 pixels -> (n, tokens_per_image, H) embeddings, at most
        max_images per run."""
        p, out = self.vision, []
        for s in range(0, len(pixels), self.max_images):
            batch = pixels[s:s + self.max_images]
            p.shape("pixel_values", batch.shape)
            self.cuda.upload(p.buffers["pixel_values"], batch)
            p.execute()
            out.append(self.cuda.download(p.buffers["image_embeds"], p.context.get_tensor_shape("image_embeds")))
        return np.concatenate(out)

    def new_cache(self, max_len: int) -> TrtCache:
        self.check_positions(max_len)
        if max_len > self.max_context:
            raise M4Error(f"a context of {max_len} tokens exceeds the engines' {self.max_context}: rebuild them "
                          "with m4 build --max-context")
        a = self.arch.text
        return TrtCache(self.cuda, a.layers, a.kv_heads, a.head_dim, max_len, self.prefilling.buffers["new_keys"].dtype)

    def save_prefix(self, cache: TrtCache, n: int) -> TrtCache:
        a = self.arch.text
        saved = TrtCache(self.cuda, a.layers, a.kv_heads, a.head_dim, n, cache.k.dtype)
        cache.copy_to(self.cuda, saved, n)
        return saved

    def load_prefix(self, cache: TrtCache, saved: TrtCache, n: int) -> None:
        saved.copy_to(self.cuda, cache, n)

    def nbytes(self, x: np.ndarray | TrtCache) -> int:
        return x.k.nbytes + x.v.nbytes if isinstance(x, TrtCache) else x.nbytes

    def logits(self, embeds: np.ndarray, pos: int, cache: TrtCache, last_only: bool) -> np.ndarray:
        """Embeddings (T, H) at positions [pos, pos + T) -> float32 logits (T or 1, vocab)."""
        t = embeds.shape[0]
        if pos + t > cache.max_len:
            raise M4Error(f"positions {pos}..{pos + t} exceed the cache's {cache.max_len}")
        if t == 1:
            return self.run(self.decoding, embeds, pos, cache, np.zeros(1))
        return self.chunked(embeds, pos, last_only,
                            lambda piece, at, keep: self.run(self.prefilling, piece, at, cache, keep))

    def run(self, p: Profile, embeds: np.ndarray, pos: int, cache: TrtCache, keep: np.ndarray) -> np.ndarray:
        t, k = len(embeds), len(keep)
        p.bind(cache)
        p.shape("inputs_embeds", (1, t, self.arch.text.hidden))
        p.shape("logits_index", (k,))
        self.cuda.upload(p.buffers["inputs_embeds"], embeds)
        self.cuda.upload(p.buffers["past_len"], np.array(pos))
        self.cuda.upload(p.buffers["logits_index"], keep)
        p.execute()
        cache.write(self.cuda, pos, t, p.buffers["new_keys"], p.buffers["new_values"])
        logits: np.ndarray = self.cuda.download(p.buffers["logits"], (k, self.arch.text.vocab)).astype(np.float32)
        return logits
