"""`m4 bench`: latency stage by stage, m4's backends and transformers side by side, in one run.

Each backend runs in a process of its own (`python -m m4.bench CONFIG`), so the peak
memory it reports is its own and one backend's caches cannot warm another's. Workloads:

  stream  frames arrive into a live window, a question every few frames:
          per-frame ingest (preprocess + vision + prefill), ttft, decode
  images  K images and a question, cold: vision, prefill, ttft, decode
  decode  a long generation after text contexts of several lengths

`hf` is transformers run the way its users run it: the processor, then `generate` over the
whole prompt for every question (it has no live context, so its frames cost nothing until
a question comes, and then all of them are encoded again).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m4.errors import M4Error
from m4.machine import machine

BACKENDS = ("torch", "onnx", "trt", "hf")
WORKLOADS = ("stream", "images", "decode")
QUESTION = "What is moving in the scene?"
FILLER = "The red square at the top left moves right, and the blue circle at the bottom stays. "


@dataclass
class BenchConfig:
    model: str  # a checkpoint directory (bundles are exported from it for `onnx`), or a bundle for onnx and trt
    backends: list[str] = field(default_factory=lambda: ["torch", "hf"])
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    frames: int = 16
    window: int = 8
    every: int = 4  # a question every N frames in `stream`
    images: int = 4
    new_tokens: int = 32
    contexts: list[int] = field(default_factory=lambda: [256, 1024])
    repeats: int = 5
    device: str = "cpu"
    bundle: str | None = None  # for `onnx` and `trt`


# -- measuring ------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident memory of this process now (Linux), not its peak."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage: ru_maxrss survives exec,
    so a child started from a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def pct(values: list[float]) -> dict:
    return {"p50": round(p(values, 50), 3), "p95": round(p(values, 95), 3)}


def collect(samples: dict[str, list[float]]) -> dict:
    return {k: pct(v) for k, v in samples.items() if v}


def demo_frames(n: int) -> list[np.ndarray]:
    from m4.media import DemoScene

    scene = DemoScene(seed=0, fps=10, duration=max(n, 1) / 10)
    return [scene.frame(i) for i in range(n)]


def text_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer.encode(FILLER * (length // 8 + 1))
    return ids[:length]


# -- m4 backends (torch, onnx) --------------------------------------------------------------

def m4_stream(model, c: BenchConfig) -> dict:
    live = model.stream(window=c.window, max_new_tokens=c.new_tokens)
    s: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i, f in enumerate(demo_frames(c.frames), start=1):
        live.add_frame(f)
        for k in ("preprocess_ms", "vision_ms", "frame_prefill_ms", "ingest_ms"):
            s.setdefault(k, []).append(live.stats[k])
        if i % c.every == 0:
            live.ask(QUESTION, max_new_tokens=c.new_tokens)
            s.setdefault("ttft_ms", []).append(live.stats["ttft_ms"])
            s.setdefault("decode_tok_s", []).append(live.stats.get("decode_tok_s", 0.0))
    wall = time.perf_counter() - t0
    return {"stages": collect(s), "frames_per_s": c.frames / wall,
            "ingest_frames_per_s": 1e3 / p(s["ingest_ms"], 50), "decode_tok_s": p(s["decode_tok_s"], 50)}


def m4_images(model, c: BenchConfig) -> dict:
    images = demo_frames(c.images)
    s: dict[str, list[float]] = {}

    def once():
        model.ask(QUESTION, images=images, max_new_tokens=c.new_tokens)
        for k in ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s"):
            s.setdefault(k, []).append(model.stats.get(k, 0.0))

    total = timed(once, c.repeats)
    s = {k: v[1:] for k, v in s.items()}  # drop the warm-up
    return {"stages": collect({**s, "total_ms": total}), "decode_tok_s": p(s["decode_tok_s"], 50)}


def m4_decode(model, c: BenchConfig) -> list[dict]:
    from m4.runtime.answer import Answer
    from m4.runtime.context import Context

    b, out = model.backend, []
    for length in c.contexts:
        ids = text_ids(model.tokenizer, length)
        s: dict[str, list[float]] = {}
        # one context, emptied for each repeat, as a live context is between questions: its
        # cache (and on CUDA the decode graph captured over it) is made in the warm-up
        ctx = Context(b, length + c.new_tokens)

        def once():
            ctx.rollback(0)
            t0 = time.perf_counter()
            logits = ctx.append("prompt", b.embed_tokens(ids))
            stats: dict = {}
            for _ in Answer(ctx, logits, c.new_tokens, set(), stats=stats, started=t0).alone():
                pass
            s.setdefault("prefill_ms", []).append(stats["ttft_ms"])
            s.setdefault("decode_tok_s", []).append(stats["decode_tok_s"])

        timed(once, c.repeats)
        s = {k: v[1:] for k, v in s.items()}
        out.append({"context": length, "stages": collect(s), "decode_tok_s": p(s["decode_tok_s"], 50),
                    "prefill_tok_s": length / p(s["prefill_ms"], 50) * 1e3})
    return out


# -- transformers, as its users run it ------------------------------------------------------

class HF:
    def __init__(self, path: str, device: str):
        import torch
        import transformers

        from m4.model.config import Arch
        from m4.tokenizer import Tokenizer

        self.torch, self.device = torch, device
        self.arch = Arch.from_dir(Path(path))
        self.tokenizer = Tokenizer.from_dir(Path(path))
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        # transformers types Module.to through a decorator that takes the model as its first argument
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa").to(device).eval()  # type: ignore[arg-type]
        size = self.arch.vision.image_size
        self.processor = transformers.LlavaProcessor(
            image_processor=transformers.SiglipImageProcessorPil(size={"height": size, "width": size}),
            tokenizer=transformers.AutoTokenizer.from_pretrained(path), patch_size=self.arch.vision.patch_size,
            vision_feature_select_strategy=self.arch.strategy, num_additional_image_tokens=0, image_token="<image>")
        self.dtype = str(dtype).removeprefix("torch.").replace("float", "fp")

    def generate(self, new_tokens: int, **inputs) -> None:
        with self.torch.inference_mode():
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            if self.device.startswith("cuda"):  # the caller's clock measures the GPU's work too
                self.torch.cuda.synchronize()

    def ask(self, images: list, new_tokens: int) -> None:
        """The processor, then generate over the whole prompt, images in front."""
        from m4.prompt import TEMPLATES

        t = TEMPLATES["qwen_1_5"]
        text = t.header + "<image>\n" * len(images) + QUESTION + t.footer
        self.generate(new_tokens, **self.processor(text=text, images=images or None, return_tensors="pt"))

    def answer_stages(self, images: list, c: BenchConfig) -> dict:
        first = timed(lambda: self.ask(images, 1), c.repeats)
        full = timed(lambda: self.ask(images, c.new_tokens), c.repeats)
        rate = (c.new_tokens - 1) / max(p(full, 50) - p(first, 50), 1e-6) * 1e3
        return {"stages": collect({"ttft_ms": first, "total_ms": full}), "decode_tok_s": rate}


def hf_stream(hf: HF, c: BenchConfig) -> dict:
    window = demo_frames(c.frames)[-c.window:]
    return hf.answer_stages(window, c)


def hf_images(hf: HF, c: BenchConfig) -> dict:
    return hf.answer_stages(demo_frames(c.images), c)


def hf_decode(hf: HF, c: BenchConfig) -> list[dict]:
    out = []
    for length in c.contexts:
        ids = hf.torch.tensor([text_ids(hf.tokenizer, length)])
        kw = {"input_ids": ids, "attention_mask": hf.torch.ones_like(ids)}
        first = timed(lambda: hf.generate(1, **kw), c.repeats)
        full = timed(lambda: hf.generate(c.new_tokens, **kw), c.repeats)
        rate = (c.new_tokens - 1) / max(p(full, 50) - p(first, 50), 1e-6) * 1e3
        out.append({"context": length, "stages": collect({"prefill_ms": first}), "decode_tok_s": rate,
                    "prefill_tok_s": length / p(first, 50) * 1e3})
    return out


# -- one backend in its own process ---------------------------------------------------------

def worker(backend: str, c: BenchConfig) -> list[dict]:
    runner: Any  # HF or m4's Model, which `run`'s functions take
    run: dict[str, Callable[[Any, BenchConfig], Any]]
    if backend == "hf":
        runner, dtype = HF(c.model, c.device), None
        run = {"stream": hf_stream, "images": hf_images, "decode": hf_decode}
        dtype = runner.dtype
    else:
        import m4

        runner = m4.load(c.bundle or c.model if backend in ("onnx", "trt") else c.model, backend=backend,
                         device=c.device)
        run = {"stream": m4_stream, "images": m4_images, "decode": m4_decode}
        dtype = str(getattr(runner.backend, "dtype", "float32")).removeprefix("torch.").replace("float", "fp")
    records = []
    for w in c.workloads:
        results = run[w](runner, c)
        for r in results if isinstance(results, list) else [results]:
            records.append({"backend": backend, "workload": w, "dtype": dtype, "quantisation": None, **r})
    peak = peak_rss_bytes()
    gpu = None
    if c.device.startswith("cuda"):
        import torch

        gpu = torch.cuda.max_memory_allocated()
    for r in records:
        r["peak_rss_bytes"], r["peak_gpu_bytes"] = peak, gpu
    return records


def run_backend(backend: str, c: BenchConfig) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "m4.bench", backend, json.dumps(asdict(c))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise M4Error(f"the {backend} benchmark failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the whole run --------------------------------------------------------------------------

def prepare_model(model: str | None, preset: str | None, random_weights: bool,
                  backends: tuple[str, ...] = ("torch", "hf")) -> str:
    """The checkpoint to measure: a MODEL, or a preset's architecture with random weights
    (latency does not depend on the values, and nothing is downloaded); a bundle where only
    bundle backends (onnx, trt) are measured."""
    from m4.resolve import cache_dir, resolve

    if preset:
        from m4.model.config import PRESETS

        if preset not in PRESETS:
            raise M4Error(f"unknown preset {preset!r}: one of {', '.join(PRESETS)}")
        if not random_weights:
            raise M4Error("--preset measures an architecture: add --random-weights, or pass --model")
        path = cache_dir() / f"random-{preset}"
        if not (path / "config.json").is_file():
            from m4.model.checkpoint import random_checkpoint

            random_checkpoint(preset, path)
        return str(path)
    path = resolve(model or "demo")
    if (path / "m4.json").is_file() and not set(backends) <= {"onnx", "trt"}:
        raise M4Error("m4 bench measures torch and hf on a checkpoint: pass the checkpoint a bundle was exported "
                      "from, or a bundle with --backends onnx,trt")
    return str(path)


def export_key(checkpoint: str) -> str:
    """What a bundle exported now would be made from: the checkpoint (its path, and its files'
    sizes and times) and the m4 code that shapes bundles (m4/export, m4/model)."""
    import hashlib

    root = Path(__file__).parent
    h = hashlib.sha256(os.path.abspath(checkpoint).encode())
    for f in sorted(Path(checkpoint).iterdir()):
        if f.is_file():
            h.update(f"{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}\n".encode())
    for f in sorted([*root.glob("export/*.py"), *root.glob("model/*.py")]):
        h.update(f.read_bytes())
    return h.hexdigest()


def cached_bundle(checkpoint: str, out: Path) -> Path:
    """An fp32 bundle of `checkpoint` at `out`, kept while its key (export_key) holds: one that
    an older m4 or another checkpoint left there is exported again."""
    from m4.export.bundle import export_bundle

    key, stamp = export_key(checkpoint), out / "bench-key"
    if not ((out / "m4.json").is_file() and stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(out, ignore_errors=True)  # ours: a cache, whatever state it is in
        export_bundle(checkpoint, out, "fp32")
        stamp.write_text(key)
    return out


def bundle_for(checkpoint: str) -> str:
    """An fp32 bundle of `checkpoint`, exported into the cache when it has none that is current."""
    import hashlib

    from m4.resolve import cache_dir

    name = hashlib.sha1(os.path.abspath(checkpoint).encode()).hexdigest()[:12]
    return str(cached_bundle(checkpoint, cache_dir() / "bench-bundles" / name))


def unavailable(backend: str, device: str, bundle: str | None = None) -> str | None:
    """Why a backend cannot run here, or None."""
    if backend == "trt":
        if bundle is None:
            return "trt runs a bundle's TensorRT engines: pass --model BUNDLE after m4 build BUNDLE"
        from m4.runtime.trt_backend import unavailable as trt_unavailable

        return trt_unavailable(Path(bundle))
    if backend == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed: pip install 'm4-vlm[onnx]'"
    if backend in ("torch", "hf") and importlib.util.find_spec("torch") is None:
        return "torch is not installed: pip install 'm4-vlm[torch]'"
    return None


def bench(c: BenchConfig, step: Callable[[str], None] = lambda s: None) -> dict:
    """Every backend of `c` on every workload; returns {"machine", "config", "records", "skipped"}."""
    for b in c.backends:
        if b not in BACKENDS:
            raise M4Error(f"unknown backend {b!r}: one of {', '.join(BACKENDS)}")
    for w in c.workloads:
        if w not in WORKLOADS:
            raise M4Error(f"unknown workload {w!r}: one of {', '.join(WORKLOADS)}, or all")
    if c.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise M4Error(f"--device {c.device}: torch sees no CUDA device here")
    given = c.model if (Path(c.model) / "m4.json").is_file() else None  # trt runs only a bundle given
    c.bundle = c.bundle or given
    records, skipped = [], {}
    for b in c.backends:
        reason = unavailable(b, c.device, given)
        if reason:
            skipped[b] = reason
            continue
        if b == "onnx" and not c.bundle:
            step("exporting an ONNX bundle")
            c.bundle = bundle_for(c.model)
        step(f"{b}: {', '.join(c.workloads)}")
        records += run_backend(b, c)
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "config": asdict(c),
            "records": records, "skipped": skipped}


def flat(record: dict) -> dict:
    """One CSV row: stage percentiles spread into columns."""
    row = {k: v for k, v in record.items() if k != "stages"}
    for stage, q in record["stages"].items():
        for k, v in q.items():
            row[f"{stage}_{k}"] = v
    return row


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], BenchConfig(**json.loads(sys.argv[2])))))
