"""The GPU fast path against transformers and against the memory-bandwidth roofline, one run.

A preset's architecture with seeded random weights (latency does not depend on the values;
nothing is downloaded): m4's torch backend in fp16 and with weight-only INT8 decoder linears,
against transformers' eager `generate` in fp16 with SDPA attention, as its users run it.

  decode      tokens/s after a text context of 512 and 6,000 tokens, and prefill tokens/s
  vision      ms per 384² frame (SigLIP + projector) at batch 1 and 8
  live        per-frame ingest ms into an 8-frame window (while it fills; once full, with
              exact and with approximate eviction), time to first token over the window
  cold        time to first token for 8 frames and a question, from nothing
  int8        logit cosine and top-1 agreement of the INT8 decoder against fp16
  roofline    the device's copy bandwidth (bytes read + written per second of a large
              device-to-device copy); decode's limit = weight bytes read per token ÷ it
  compiled    fp16 decode again with the static step through torch.compile (last: it
              compiles for a while first)

    python benchmarks/gpu.py [--preset 0.5b] [--json benchmarks/results/gpu-0.5b.json]

Needs CUDA (one line and exit status 2 without). The copy and the bare graph replay are
timed with CUDA events; everything else with wall clocks around work that ends in a
synchronize (logits come back to the host; encode_images and hf generate synchronize).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import m4
from m4.bench import HF, QUESTION, BenchConfig, demo_frames, hf_decode, m4_decode, p, prepare_model, text_ids, \
    timed
from m4.machine import machine
from m4.media import preprocess
from m4.model.config import PRESETS
from m4.model.int8 import Int8Linear
from m4.runtime.context import Context
from m4.runtime.backend import CACHE_BUCKET

CONTEXTS = [512, 6000]
NEW_TOKENS = 64
REPEATS = 5
WINDOW = 8
console = Console(stderr=True)


def cuda_us(fn, repeats: int = 200) -> float:
    """Microseconds per call of `fn`, back to back on the GPU (CUDA events)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


def bandwidth(gib: int = 1, repeats: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy of `gib` GiB."""
    a = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (cuda_us(lambda: b.copy_(a), repeats) / 1e6)


def int8_kernels(arch) -> dict:
    """One decode row through each decoder linear's shape: fp16, the fused int8 kernel and
    dequantise-then-matmul, so the int8 path's choice can be checked on this GPU."""
    t, out = arch.text, {}
    for name, (n, k) in {"qkv": (t.hidden, t.hidden), "gate/up": (t.mlp, t.hidden), "down": (t.hidden, t.mlp),
                         "lm_head": (t.vocab, t.hidden)}.items():
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
        q, x = Int8Linear(linear), torch.randn(1, k, device="cuda", dtype=torch.float16)
        r = {"fp16_us": cuda_us(lambda: linear(x)), "fused": q.fused}
        if q.fused:
            r["fused_us"] = cuda_us(lambda: q(x))
        q.fused = False
        r["dequant_us"] = cuda_us(lambda: q(x))
        out[f"{name} {n}x{k}"] = r
    return out


def decode_weight_bytes(text: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every layer, the final norm and lm_head. The
    embedding table gives one row (counted as nothing); a tied lm_head reads all of it."""
    parts = (text.layers, text.norm, text.lm_head)
    return sum(t.numel() * t.element_size() for m in parts for t in [*m.parameters(), *m.buffers()])


def replay_ms(model, length: int, repeats: int = 200) -> float:
    """The captured decode step alone, replayed back to back at context `length`: the GPU's
    time per token without the host's (logits to numpy, sampling, the next embedding)."""
    b = model.backend
    ctx = Context(b, length + 1)
    ctx.append("prompt", b.embed_tokens(text_ids(model.tokenizer, length)))
    ctx.append("answer", b.embed_tokens([0]))  # captures the cache's graph
    return cuda_us(b.graphs.graphs[b.graphs.key([ctx.cache], 1)].graph.replay, repeats) / 1e3


def m4_vision(model, frames) -> dict:
    out = {}
    for n in (1, WINDOW):
        pixels = preprocess(frames[:n], model.arch.vision.image_size)
        out[n] = p(timed(lambda: model.backend.encode_images(pixels), REPEATS, warmup=2), 50) / n
    return out


def m4_live(model, frames, exact: bool) -> dict:
    """Ingest ms while the window fills (its first frame, which captures the vision graph,
    left out) and once it is full; then the time to first token of questions over it."""
    live = model.stream(window=WINDOW, exact=exact, max_new_tokens=NEW_TOKENS)
    stages = {k: [] for k in ("ingest_ms", "preprocess_ms", "vision_ms", "frame_prefill_ms")}
    for f in frames:
        live.add_frame(f)
        for k, v in stages.items():
            v.append(live.stats[k])
    ingest = stages["ingest_ms"]
    ttft, rate = [], []
    for _ in range(REPEATS + 1):  # the first captures the decode graph
        live.ask(QUESTION, max_new_tokens=NEW_TOKENS)
        ttft.append(live.stats["ttft_ms"])
        rate.append(live.stats.get("decode_tok_s", 0.0))
    return {"filling": p(ingest[1:WINDOW], 50), "full": p(ingest[WINDOW:], 50), "ttft_ms": p(ttft[1:], 50),
            "decode_tok_s": p(rate[1:], 50),
            "stages_full_ms": {k: p(v[WINDOW:], 50) for k, v in stages.items()},
            "stages_filling_ms": {k: p(v[1:WINDOW], 50) for k, v in stages.items()}}


def m4_cold_ttft(model, frames) -> float:
    ttft = []
    for _ in range(REPEATS + 1):
        model.ask(QUESTION, video=frames[:WINDOW], max_new_tokens=1)
        ttft.append(model.stats["ttft_ms"])
    return p(ttft[1:], 50)


def measure_m4(r: dict, path: str, dtype: str, frames, cfg: BenchConfig, bw: float):
    """Fills `r` as it goes (a failure leaves what was measured); returns the model."""
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = m4.load(path, backend="torch", device="cuda", dtype=dtype)
    if dtype == "int8":
        linears = [m for m in model.backend.model.text.modules() if hasattr(m, "fused")]
        r["int8_fused_kernel"] = all(m.fused for m in linears)
    decode_against_roofline(r, model, cfg, bw)
    r["vision_ms_per_frame"] = m4_vision(model, frames)
    exact, approx = m4_live(model, frames, exact=True), m4_live(model, frames, exact=False)
    r["ingest_ms"] = {"filling": exact["filling"], "full_exact": exact["full"], "full_approximate": approx["full"]}
    r["ingest_stages_ms"] = {"filling": exact["stages_filling_ms"], "full_exact": exact["stages_full_ms"],
                             "full_approximate": approx["stages_full_ms"]}
    r["live_ttft_ms"], r["window_decode_tok_s"] = exact["ttft_ms"], exact["decode_tok_s"]
    r["cold_ttft_ms"] = m4_cold_ttft(model, frames)
    r["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() - base
    return model


def measure_compiled(r: dict, path: str, cfg: BenchConfig, bw: float) -> None:
    """fp16 decode with its static step through torch.compile, captured in the same graphs."""
    model = m4.load(path, backend="torch", device="cuda", dtype="float16")
    model.backend.compile()
    b, t0 = model.backend, time.perf_counter()
    ctx = Context(b, 64)
    ctx.append("prompt", b.embed_tokens(text_ids(model.tokenizer, 32)))
    ctx.append("answer", b.embed_tokens([0]))  # compiles, then captures
    r["compile_s"] = time.perf_counter() - t0
    decode_against_roofline(r, model, cfg, bw)


def decode_against_roofline(r: dict, model, cfg: BenchConfig, bw: float) -> None:
    weights = decode_weight_bytes(model.backend.model.text)
    kv = model.arch.kv_bytes_per_token(2)
    r.update(decode={}, decode_weight_bytes=weights)
    for d in m4_decode(model, cfg):
        n = d["context"]
        read = weights + kv * -(-(n + cfg.new_tokens) // CACHE_BUCKET) * CACHE_BUCKET  # the whole buffer
        r["decode"][n] = {"decode_tok_s": d["decode_tok_s"], "prefill_tok_s": d["prefill_tok_s"],
                          "roofline_ms": weights / bw * 1e3, "roofline_with_kv_ms": read / bw * 1e3,
                          "pct_of_roofline": 100 * weights / bw * d["decode_tok_s"],
                          "pct_of_roofline_with_kv": 100 * read / bw * d["decode_tok_s"]}
    for n, d in r["decode"].items():
        d["graph_replay_ms"] = replay_ms(model, n)
        d["pct_of_roofline_graph_only"] = 100 * d["roofline_ms"] / d["graph_replay_ms"]


def int8_error(fp16, int8, length: int = 256, steps: int = 32) -> dict:
    """Prompt logits (prefill) and teacher-forced decode logits (the fused kernel, the graph)
    of the int8 decoder against fp16, on the fp16 model's greedy continuation."""
    ids = text_ids(fp16.tokenizer, length)
    out = {}
    for name, model in (("fp16", fp16), ("int8", int8)):
        b = model.backend
        cache = b.new_cache(length + steps)
        out[name] = [b.forward(b.embed_tokens(ids), 0, cache, last_only=False)]
        if name == "fp16":
            answer = []
            for i in range(steps):
                answer.append(int(np.argmax(out[name][-1][-1])))
                out[name].append(b.forward(b.embed_tokens(answer[-1:]), length + i, cache))
        else:
            out[name] += [b.forward(b.embed_tokens([t]), length + i, cache) for i, t in enumerate(answer)]
    a, q = (np.concatenate(out[k]) for k in ("fp16", "int8"))
    cos = (a * q).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(q, axis=-1)
    agree = a.argmax(-1) == q.argmax(-1)
    return {"positions": len(a), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "top1_agreement": float(agree.mean()), "top1_agreement_decode": float(agree[length:].mean())}


def measure_hf(r: dict, path: str, frames, cfg: BenchConfig) -> None:
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hf = HF(path, "cuda")
    r["decode"] = {d["context"]: {"decode_tok_s": d["decode_tok_s"], "prefill_tok_s": d["prefill_tok_s"]}
                   for d in hf_decode(hf, cfg)}
    r["vision_ms_per_frame"] = {}
    for n in (1, WINDOW):
        px = hf.processor.image_processor(frames[:n], return_tensors="pt")["pixel_values"].to(hf.device, hf.model.dtype)

        def encode():
            with torch.inference_mode():
                hf.model.get_image_features(pixel_values=px)
            torch.cuda.synchronize()

        r["vision_ms_per_frame"][n] = p(timed(encode, REPEATS, warmup=2), 50) / n
    window = hf.answer_stages(frames[:WINDOW], cfg)  # the processor, then generate over 8 frames
    r["cold_ttft_ms"], r["window_decode_tok_s"] = window["stages"]["ttft_ms"]["p50"], window["decode_tok_s"]
    r["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() - base


def show(result: dict) -> None:
    b = result["backends"]
    names = list(b)
    t = Table("", *names, title=f"{result['preset']} (random weights) on {result['machine'].get('gpu')}, "
              f"copy bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s")

    def row(label, get, fmt="{:.1f}"):
        cells = []
        for n in names:
            try:
                cells.append(fmt.format(get(b[n])))
            except (KeyError, TypeError):
                cells.append("-")
        t.add_row(label, *cells)

    for n in CONTEXTS:
        row(f"decode tok/s @{n}", lambda r: r["decode"][n]["decode_tok_s"])
        row("  % of weights roofline", lambda r: r["decode"][n]["pct_of_roofline"], "{:.0f}%")
        row("  graph replay ms/token", lambda r: r["decode"][n]["graph_replay_ms"], "{:.3f}")
        row("  % of roofline, graph alone", lambda r: r["decode"][n]["pct_of_roofline_graph_only"], "{:.0f}%")
        row(f"prefill tok/s @{n}", lambda r: r["decode"][n]["prefill_tok_s"], "{:.0f}")
    row("vision ms/frame, batch 1", lambda r: r["vision_ms_per_frame"][1], "{:.2f}")
    row(f"vision ms/frame, batch {WINDOW}", lambda r: r["vision_ms_per_frame"][WINDOW], "{:.2f}")
    row("ingest ms/frame, filling", lambda r: r["ingest_ms"]["filling"], "{:.2f}")
    row("ingest ms/frame, full (exact)", lambda r: r["ingest_ms"]["full_exact"], "{:.2f}")
    row("ingest ms/frame, full (approx.)", lambda r: r["ingest_ms"]["full_approximate"], "{:.2f}")
    row(f"ttft ms, live {WINDOW}-frame window", lambda r: r["live_ttft_ms"])
    row(f"ttft ms, {WINDOW} frames cold", lambda r: r["cold_ttft_ms"])
    row(f"decode tok/s over the {WINDOW} frames", lambda r: r["window_decode_tok_s"])
    row("peak GPU memory GB", lambda r: r["peak_gpu_bytes"] / 1e9, "{:.2f}")
    row("torch.compile s", lambda r: r["compile_s"])
    out = Console(width=160)
    out.print(t)
    for key in ("roofline_ms", "int8_kernels", "int8_error", "speedup_vs_hf", "errors"):
        out.print(f"{key}: {result.get(key)}")


def speedups(b: dict) -> dict:
    """Each m4 variant over transformers, for what both sides measured."""
    hf, out = b.get("hf fp16", {}), {}
    costs = {f"decode @{n}": lambda r, n=n: 1 / r["decode"][n]["decode_tok_s"] for n in CONTEXTS}
    costs |= {"cold ttft": lambda r: r["cold_ttft_ms"], "vision batch 1": lambda r: r["vision_ms_per_frame"][1]}
    for name, r in b.items():
        for what, cost in costs.items():
            try:
                if name != "hf fp16":
                    out[f"{name}: {what}"] = cost(hf) / cost(r)
            except KeyError:
                pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/gpu-PRESET.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: needs a CUDA device, and torch sees none here", file=sys.stderr)
        sys.exit(2)
    out = args.json or Path(__file__).parent / "results" / f"gpu-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"random {args.preset} checkpoint")
    path = prepare_model(None, args.preset, True)
    frames = demo_frames(2 * WINDOW)
    cfg = BenchConfig(model=path, contexts=CONTEXTS, new_tokens=NEW_TOKENS, repeats=REPEATS, device="cuda")
    bw = bandwidth()
    b: dict[str, dict] = {}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "preset": args.preset,
              "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "bandwidth_bytes_per_s": bw,
              "backends": b, "errors": {}}

    def section(name: str, fn):
        """One part of the run, so that one run gives every part it can: a part that fails is
        recorded with its error and the run goes on; the JSON is rewritten after each part."""
        console.print(name)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (any failure: record it, keep the other parts)
            traceback.print_exc()
            result["errors"][name] = f"{type(e).__name__}: {e}"
        finally:
            result["speedup_vs_hf"] = speedups(b)
            if "decode_weight_bytes" in b.get("m4 fp16", {}):
                result["roofline_ms"] = b["m4 fp16"]["decode_weight_bytes"] / bw * 1e3
            out.write_text(json.dumps(result, indent=2))

    result["int8_kernels"] = section("int8 kernels", lambda: int8_kernels(PRESETS[args.preset]))
    fp16 = section("m4 fp16", lambda: measure_m4(b.setdefault("m4 fp16", {}), path, "float16", frames, cfg, bw))
    int8 = section("m4 int8", lambda: measure_m4(b.setdefault("m4 int8", {}), path, "int8", frames, cfg, bw))
    if fp16 and int8:
        result["int8_error"] = section("int8 error against fp16", lambda: int8_error(fp16, int8))
    del fp16, int8
    gc.collect()
    torch.cuda.empty_cache()
    hf_cfg = BenchConfig(**{**cfg.__dict__, "repeats": 3})
    section("transformers fp16 (sdpa), eager generate", lambda: measure_hf(b.setdefault("hf fp16", {}), path, frames, hf_cfg))
    gc.collect()
    torch.cuda.empty_cache()
    # last: compiling takes a while, and the parts above are saved whatever happens here
    section("m4 fp16 compiled", lambda: measure_compiled(b.setdefault("m4 fp16 compiled", {}), path, cfg, bw))
    show(result)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
