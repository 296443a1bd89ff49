"""Aggregate decode tokens/s of N contexts answering at once (one Batch, one decode step for
all) against the same contexts answered one after another (each answer alone), m4 ONNX
Runtime (fp32 bundle) and m4 torch, on a preset's architecture with random weights.

Each context is what a live context is between questions: a history of `--context` random
tokens prefilled once and marked; an answer prefills a question of `--question` random tokens
after it and decodes exactly `--new-tokens` (no stop token), and closing it rolls the context
back to the mark. Only decoding is timed: tokens/s counts every answer's tokens after its
first (which its question's prefill picks) over the time to decode them. The batched tokens
of every context are checked against its alone tokens. Then a question that arrives while 3
other contexts decode (its prefill runs between two batched steps, then it joins the batch):
its time to first token against the same question's alone, and the batched step times.
Each figure is the best of `--repeats`, sequential and batched runs alternating.

    python benchmarks/streams.py [--preset 0.5b] [--streams 1 2 4 8] [--context 512] [--question 16]
                                 [--new-tokens 32] [--repeats 2] [--threads N] [--backends onnx torch]
                                 [--workdir DIR] [--json out.json] [--quick]

The checkpoint and its bundle are built once in --workdir (shared with benchmarks/decode.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import m4
from decode import float_model
from m4.machine import machine
from m4.resolve import cache_dir
from m4.runtime.answer import Answer, Batch
from m4.runtime.context import Context

console = Console(stderr=True)
JOINING = 3  # contexts decoding when a question arrives


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)]


def history(backend, ids: list[int], room: int) -> Context:
    """A context holding `ids`, with room for a question and its answer after them."""
    ctx = Context(backend, len(ids) + room)
    ctx.append("history", backend.embed_tokens(ids))
    return ctx


def start(ctx: Context, question: list[int], n: int) -> Answer:
    """The question prefilled after the history, as a live context's start does: an answer of
    exactly n tokens (no stop set) whose closing rolls the question back."""
    mark, t0 = ctx.mark(), time.perf_counter()
    first = ctx.append("question", ctx.backend.embed_tokens(question))
    return Answer(ctx, first, n, set(), stats={}, started=t0, mark=mark)


def sequential(contexts: list[Context], questions: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    """Each context answered alone, one after another: (tokens, decode seconds)."""
    tokens, total = [], 0.0
    for ctx, q in zip(contexts, questions):
        answer = start(ctx, q, n)
        t0 = time.perf_counter()
        tokens.append(list(answer.alone()))
        total += time.perf_counter() - t0
        answer.close()
    return tokens, total


def batched(contexts: list[Context], questions: list[list[int]], n: int) -> tuple[list[list[int]], float, list[float]]:
    """Every context's question prefilled, then one Batch stepped until all answers end:
    (tokens, decode seconds, the times of the steps that decode)."""
    batch = Batch()
    answers = [batch.join(start(ctx, q, n)) for ctx, q in zip(contexts, questions)]
    tokens: dict[int, list[int]] = {id(a): [] for a in answers}
    steps = []
    t0 = time.perf_counter()
    while len(batch):
        s = time.perf_counter()
        for a, t in batch.step():
            tokens[id(a)].append(t)
        steps.append(time.perf_counter() - s)
    return [tokens[id(a)] for a in answers], time.perf_counter() - t0, steps[1:]  # the first gives prefills' tokens


def joining(contexts: list[Context], questions: list[list[int]], n: int) -> dict:
    """Context JOINING's question alone, then arriving while contexts [0, JOINING) decode: its
    prefill runs between two batched steps and it joins; its first token comes out of the
    next step. Milliseconds, and its tokens both ways."""
    ctx, q = contexts[JOINING], questions[JOINING]
    answer = start(ctx, q, n)
    alone_tokens = list(answer.alone())
    answer.close()
    alone = answer.stats["ttft_ms"]  # its first token is the prefill's

    batch = Batch()
    for c, qq in zip(contexts[:JOINING], questions[:JOINING]):
        batch.join(start(c, qq, n))
    batch.step()  # their first tokens, from their prefills
    before = [timeit(batch.step) for _ in range(max(1, min(4, n // 4)))]
    t0 = time.perf_counter()
    new = batch.join(start(ctx, q, n))
    prefill = time.perf_counter() - t0
    joined_tokens = []
    while not joined_tokens:
        joined_tokens += [t for a, t in batch.step() if a is new]
    ttft = time.perf_counter() - t0
    after = []
    while len(batch) == JOINING + 1:
        s = time.perf_counter()
        joined_tokens += [t for a, t in batch.step() if a is new]
        after.append(time.perf_counter() - s)
    while len(batch):
        joined_tokens += [t for a, t in batch.step() if a is new]
    return {"ttft_alone_ms": alone, "ttft_joined_ms": ttft * 1e3, "prefill_ms": prefill * 1e3,
            f"step_ms_{JOINING}": 1e3 * float(np.median(before)),
            f"step_ms_{JOINING + 1}": 1e3 * float(np.median(after)) if after else None,
            "tokens_equal": joined_tokens == alone_tokens}


def timeit(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def measure(name: str, model, args) -> tuple[list[dict], dict]:
    b = model.backend
    vocab, count, room = b.arch.text.vocab, max(max(args.streams), JOINING + 1), args.question + args.new_tokens
    console.print(f"{name}: prefilling {count} contexts of {args.context} tokens")
    contexts = [history(b, random_ids(vocab, args.context, i), room) for i in range(count)]
    questions = [random_ids(vocab, args.question, 1000 + i) for i in range(count)]
    rows = []
    for n in args.streams:
        ctxs, qs = contexts[:n], questions[:n]
        sequential(ctxs, qs, 3)  # a context's first step, and a first step of n rows, bind their
        batched(ctxs, qs, 3)  # buffers (once in a context's life): not throughput
        seq, bat = [], []
        for _ in range(args.repeats):
            seq.append(sequential(ctxs, qs, args.new_tokens))
            bat.append(batched(ctxs, qs, args.new_tokens))
        alone_tokens = seq[0][0]
        for i in sorted({i for r in seq + bat for i, (x, y) in enumerate(zip(r[0], alone_tokens)) if x != y}):
            console.print(f"[red]{name}, {n} streams: context {i}'s batched tokens differ from its alone tokens[/red]")
        tokens = n * (args.new_tokens - 1)
        s, (_, t, steps) = min(r[1] for r in seq), min(bat, key=lambda r: r[1])
        equal = all(r[0] == alone_tokens for r in seq + bat)
        rows.append({"backend": name, "streams": n, "sequential_tok_s": tokens / s, "batched_tok_s": tokens / t,
                     "speedup": s / t, "batched_step_ms": 1e3 * float(np.median(steps)), "tokens_equal": equal,
                     "load_avg": os.getloadavg()[0]})
        console.print(f"{name}, {n} streams: sequential {tokens / s:.1f} tok/s, batched {tokens / t:.1f} tok/s "
                      f"({s / t:.2f}x)")
    joins = [joining(contexts, questions, args.new_tokens) for _ in range(args.repeats)]
    join = {"backend": name, **min(joins, key=lambda j: j["ttft_joined_ms"]),
            "ttft_alone_ms": min(j["ttft_alone_ms"] for j in joins),
            "tokens_equal": all(j["tokens_equal"] for j in joins)}
    if not join["tokens_equal"]:
        console.print(f"[red]{name}: the joining question's tokens differ from its alone tokens[/red]")
    return rows, join


def report(rows: list[dict], joins: list[dict]) -> None:
    out = Console()
    t = Table("backend", "streams", "sequential tok/s", "batched tok/s", "ratio",
              "step ms", "same tokens", title="decode of N contexts at once")
    for r in rows:
        t.add_row(r["backend"], str(r["streams"]), f"{r['sequential_tok_s']:.1f}", f"{r['batched_tok_s']:.1f}",
                  f"{r['speedup']:.2f}x", f"{r['batched_step_ms']:.1f}", "yes" if r["tokens_equal"] else "NO")
    out.print(t)
    for j in joins:
        four = j[f"step_ms_{JOINING + 1}"]
        out.print(f"{j['backend']}: a question arriving while {JOINING} contexts decode: ttft "
                  f"{j['ttft_joined_ms']:.1f} ms (its prefill {j['prefill_ms']:.1f} ms, then a step), alone "
                  f"{j['ttft_alone_ms']:.1f} ms; batched step {j[f'step_ms_{JOINING}']:.1f} ms with {JOINING}"
                  + (f", {four:.1f} ms with {JOINING + 1}" if four else ""))
    speedup = {r["streams"]: r["speedup"] for r in rows if r["backend"] == "onnx"}
    goals = [f"{speedup[n]:.2f}x at {n} (goal >= {g}x)" for n, g in ((4, 2.5), (8, 4)) if n in speedup]
    if goals:
        out.print("onnx fp32: " + ", ".join(goals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8], help="contexts answering at once")
    ap.add_argument("--context", type=int, default=512, help="tokens each context holds before its question")
    ap.add_argument("--question", type=int, default=16, help="tokens of each question")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each; the best is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op and torch threads")
    ap.add_argument("--backends", nargs="+", default=["onnx", "torch"], choices=["onnx", "torch"])
    ap.add_argument("--device", default="cpu", help="the torch backend's device: cpu (fp32) or cuda (fp16, "
                    "decode steps replayed from CUDA graphs)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="smoke run: demo preset, 64-token contexts, 8 tokens")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.context, args.new_tokens, args.repeats = "demo", 64, 8, 1
    checkpoint, bundle = float_model(args.workdir or cache_dir() / f"bench-decode-{args.preset}", args.preset,
                                     bundle="onnx" in args.backends)
    torch.set_num_threads(args.threads)
    rows, joins = [], []
    for name in args.backends:
        if name == "onnx":
            model = m4.load(str(bundle), backend="onnx", threads=args.threads, verify=False)
        else:
            model = m4.load(str(checkpoint), backend="torch", device=args.device)
            name = "torch" if args.device == "cpu" else f"torch {args.device}"
        r, j = measure(name, model, args)
        rows += r
        joins.append(j)
        del model
        gc.collect()
    report(rows, joins)
    if args.json:
        info = {**machine(), "threads": args.threads, "onnxruntime": __import__("onnxruntime").__version__}
        record = {"machine": info, "preset": args.preset, "context": args.context, "question": args.question,
                  "new_tokens": args.new_tokens, "repeats": args.repeats, "results": rows, "joining": joins}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
