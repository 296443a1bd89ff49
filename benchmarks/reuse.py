"""Requests that do not start from zero, measured side by side in one run:

  conversation  the client resends the whole conversation each turn, one image added a
                turn: each turn's time to first token cold (nothing reused) and through the
                encoder and prefix caches (m4.runtime.reuse), turn by turn, alternating
  frame         one frame asked --questions different questions (each question's text before
                the image, so only the system prompt's prefix is shared): vision calls and
                time to first token, cold and through the caches
  bounded       (demo) --bounded distinct requests through caches of 8 + 16 MiB: the bytes
                held never pass them, evictions, resident memory

For each model: the shipped demo (torch, fp32), and the `0.5b` architecture with random
weights (torch, bf16 on the CPU: its fp32 weights would not leave room for much else on a
small machine), whose checkpoint is written once into --workdir.

    python benchmarks/reuse.py [--models demo,0.5b] [--turns 4] [--questions 8]
                               [--repeats demo=5,0.5b=1] [--bounded 1000] [--workdir DIR] [--json benchmarks/results/reuse.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import m4
from m4.bench import demo_frames
from m4.machine import machine
from m4.prompt import build_chat
from m4.resolve import cache_dir
from m4.runtime.reuse import Reuse

QUESTIONS = ["What is in <image>?", "And what changed in <image>?", "Which one is brighter, <image>?",
             "Count the shapes in <image>.", "Where did it go in <image>?", "Is anything missing in <image>?"]
ANSWER = "A red square moves to the left of the blue circle."
DTYPES = {"demo": None, "0.5b": "bfloat16"}


def load(name: str, workdir: Path):
    if name == "demo":
        return m4.load("demo", backend="torch")
    from m4.model.checkpoint import random_checkpoint

    ckpt = workdir / name
    if not (ckpt / "config.json").is_file():
        print(f"random {name} checkpoint -> {ckpt}", file=sys.stderr)
        random_checkpoint(name, ckpt, dtype="bf16")
    return m4.load(str(ckpt), backend="torch", dtype=DTYPES[name])


def ttft(model, p, pictures, reuse: Reuse) -> tuple[float, int]:
    """Time to first token (ms) of one prompt, and the tokens it loaded from the prefix cache."""
    t0 = time.perf_counter()
    answer = model.start(p, pictures, 1, reuse=reuse)
    ms = (time.perf_counter() - t0) * 1e3
    return ms, answer.stats["cached_tokens"]


def conversation(model, turns: int, repeats: int) -> list[dict]:
    """Each turn's ttft, cold and reused, the median of `repeats` conversations (each through
    caches of its own)."""
    a, images = model.arch, demo_frames(turns)
    prompts = [build_chat(model.template, model.tokenizer, a.image_token_id, a.tokens_per_image,
                          [(q, 1, ANSWER) for q in QUESTIONS[:k - 1]] + [(QUESTIONS[k - 1], 1, None)])
               for k in range(1, turns + 1)]
    runs = []
    for _ in range(repeats):
        reuse = Reuse(128, 256)
        runs.append([(ttft(model, p, images[:k], Reuse())[0], *ttft(model, p, images[:k], reuse))
                     for k, p in enumerate(prompts, 1)])
    rows = []
    for k, p in enumerate(prompts, 1):
        cold, warm, cached = (float(np.median([run[k - 1][i] for run in runs])) for i in range(3))
        rows.append({"turn": k, "prompt_tokens": len(p.ids), "cached_tokens": int(cached), "cold_ms": cold,
                     "reuse_ms": warm})
        print(f"  turn {k}: {len(p.ids)} tokens ({int(cached)} cached): {cold:.1f} ms cold, {warm:.1f} ms reused",
              file=sys.stderr)
    return rows


def frame(model, questions: int) -> dict:
    """One frame, `questions` questions: vision calls and ttft, cold and reused."""
    calls = []
    encode = model.backend.encode_images
    model.backend.encode_images = lambda px: calls.append(len(px)) or encode(px)
    image = demo_frames(1)
    out = {}
    for mode, reuse in (("cold", None), ("reuse", Reuse(128, 256))):
        calls.clear()
        times = [ttft(model, *model.prepare(f"Skill {k} asks: what is at <image>?", images=image), reuse or Reuse())[0]
                 for k in range(questions)]
        out[mode] = {"vision_calls": len(calls), "first_ms": times[0], "rest_ms_mean": float(np.mean(times[1:]))}
        print(f"  {mode}: {len(calls)} vision calls, ttft {times[0]:.1f} ms then {np.mean(times[1:]):.1f} ms",
              file=sys.stderr)
    model.backend.encode_images = encode
    return out


def rss_mib() -> float:
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS"))) / 1024


def bounded(model, requests: int, image_mb: float, prefix_mb: float) -> dict:
    """`requests` distinct requests (a new image each, the text numbered) through small caches:
    the bytes they hold against their bounds, evictions, and the process's resident memory
    after the first 100 requests and at the end."""
    reuse, rng = Reuse(image_mb, prefix_mb), np.random.default_rng(0)
    peak, at_100 = 0, 0.0
    for k in range(requests):
        image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
        model.start(*model.prepare(f"Request {k}: what is in <image>?", images=[image]), 1, reuse=reuse)
        peak = max(peak, reuse.images.bytes + reuse.prefixes.bytes)
        if k == 99:
            at_100 = rss_mib()
    out = {"requests": requests, "bound_mib": image_mb + prefix_mb, "peak_held_mib": peak / 2**20,
           "rss_mib_at_100": at_100, "rss_mib_at_end": rss_mib(), **reuse.stats()}
    print(f"  {requests} distinct requests: held at most {peak / 2**20:.1f} of {image_mb + prefix_mb:g} MiB, "
          f"evictions {reuse.images.evictions} images / {reuse.prefixes.evictions} prefixes, "
          f"RSS {at_100:.0f} MiB at 100 -> {out['rss_mib_at_end']:.0f} MiB", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,0.5b")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--bounded", type=int, default=1000, help="distinct requests through small caches (demo only)")
    ap.add_argument("--repeats", default="demo=5,0.5b=1", help="conversations measured per model (the median kept)")
    ap.add_argument("--workdir", type=Path, default=cache_dir() / "bench-reuse")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    repeats = {k: int(v) for k, v in (x.split("=") for x in args.repeats.split(","))}
    result = {"machine": machine(), "command": " ".join(sys.argv), "models": {}}
    for name in args.models.split(","):
        print(f"{name}:", file=sys.stderr)
        model = load(name, args.workdir)
        model.start(*model.prepare("Warm up.", images=demo_frames(1)), 1, reuse=Reuse())
        result["models"][name] = {"conversation": conversation(model, args.turns, repeats.get(name, 1)),
                                  "frame": frame(model, args.questions)}
        if name == "demo" and args.bounded:
            result["models"][name]["bounded"] = bounded(model, args.bounded, 8, 16)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
