"""Prefill and decode tokens/s of one decoder four ways, side by side in one run: m4's ONNX
Runtime backend, m4's torch backend, transformers `generate`, and the decoder that
onnxruntime-genai's model builder makes from the same weights (fp32, CPU).

The model is a preset's architecture with seeded random weights (no download): a LLaVA
checkpoint for m4 and its Qwen2 decoder as a transformers Qwen2ForCausalLM for the other
two. Every backend prefills the same random prompt of `context` tokens, then decodes
`--new-tokens` greedily. Prefill: the fastest of `--repeats` runs. Decode tokens/s: one
over the median step (the steps after the first token, of all repeats), robust to a
neighbour's burst on a shared machine; `decode_tok_s_mean` is the best run's mean rate.

    python benchmarks/decode.py [--preset 0.5b] [--contexts 512 4096] [--new-tokens 32]
                                [--repeats 2] [--threads N] [--workdir DIR] [--json out.json] [--quick]

Artifacts (checkpoint, bundle, Qwen2 directory, genai model) are built once in --workdir.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from rich.console import Console
from rich.table import Table

from m4.bench import cached_bundle, machine
from m4.model.checkpoint import random_checkpoint, read_weights
from m4.model.config import Arch
from m4.resolve import cache_dir
from m4.runtime.onnx_backend import OnnxBackend
from m4.runtime.torch_backend import TorchBackend

console = Console(stderr=True)


# -- artifacts --------------------------------------------------------------------------

def build(workdir: Path, preset: str, genai: bool) -> dict[str, Path]:
    paths = {k: workdir / k for k in ("checkpoint", "bundle", "qwen2", "genai")}
    if not (paths["checkpoint"] / "config.json").is_file():
        console.print(f"random {preset} checkpoint -> {paths['checkpoint']}")
        random_checkpoint(preset, paths["checkpoint"])
    cached_bundle(str(paths["checkpoint"]), paths["bundle"])  # exported again when m4's export changed
    if not (paths["qwen2"] / "config.json").is_file():
        console.print(f"its decoder as a transformers Qwen2ForCausalLM -> {paths['qwen2']}")
        save_qwen2(paths["checkpoint"], paths["qwen2"])
    if genai and not (paths["genai"] / "genai_config.json").is_file():
        console.print(f"onnxruntime-genai model builder (fp32, cpu) -> {paths['genai']}")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(paths["qwen2"]),
                        "-o", str(paths["genai"]), "-p", "fp32", "-e", "cpu", "-c", str(workdir / "genai-cache"),
                        "--extra_options", "prune_lm_head=true"], check=True, stdout=subprocess.DEVNULL)
    return paths


def save_qwen2(checkpoint: Path, out: Path) -> None:
    """The LLaVA checkpoint's decoder, weights and all, in transformers' Qwen2 layout."""
    tc = dict(Arch.from_dir(checkpoint).to_hf()["text_config"])
    del tc["model_type"]
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**tc))
    weights = {("lm_head." + k[len("text.lm_head."):]) if k.startswith("text.lm_head.") else "model." + k[5:]: w
               for k, w in read_weights(checkpoint).items() if k.startswith("text.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied: lm_head is embed
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((checkpoint / f).read_bytes())


# -- one backend each: (prefill seconds, decode tokens/s) -------------------------------

def m4_backend(b, ids: list[int], n: int) -> tuple[float, list[float]]:
    cache = b.new_cache(len(ids) + n)
    t0 = time.perf_counter()
    logits = b.forward(b.embed_tokens(ids), 0, cache)
    times = [time.perf_counter()]
    for i in range(n - 1):
        logits = b.forward(b.embed_tokens([int(np.argmax(logits[-1]))]), len(ids) + i, cache)
        times.append(time.perf_counter())
    return times[0] - t0, list(np.diff(times))


class Clock:
    """A generate() streamer that notes when each token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, ids):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(model, ids: list[int], n: int) -> tuple[float, list[float]]:
    x = torch.tensor([ids])
    clock = Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=clock, pad_token_id=0)
    return clock.times[1] - t0, list(np.diff(clock.times[1:]))


def genai(model, ids: list[int], n: int) -> tuple[float, list[float]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)  # the prefill forward
    t1 = time.perf_counter()
    gen.generate_next_token()  # picks the first token from the prefill's logits
    times = [time.perf_counter()]
    for _ in range(n - 1):  # a forward each
        gen.generate_next_token()
        times.append(time.perf_counter())
    return t1 - t0, list(np.diff(times))


def loaders(paths: dict[str, Path], threads: int):
    """name -> (load, run); each is loaded, measured at every context and freed in turn."""
    arch = Arch.from_dir(paths["checkpoint"])
    torch.set_num_threads(threads)

    def load_genai():
        import onnxruntime_genai as og

        # the builder leaves the thread count to genai, which runs one: give it ours
        f = paths["genai"] / "genai_config.json"
        config = json.loads(f.read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        f.write_text(json.dumps(config, indent=4))
        return og.Model(str(paths["genai"]))

    return {
        "m4 onnx": (lambda: OnnxBackend(paths["bundle"], "cpu", threads), m4_backend),
        "m4 torch": (lambda: TorchBackend(paths["checkpoint"], arch, "cpu"), m4_backend),
        "transformers": (lambda: transformers.Qwen2ForCausalLM.from_pretrained(paths["qwen2"]).eval(), hf_generate),
        "ort-genai": (load_genai, genai),
    }


# -- report -----------------------------------------------------------------------------

def ratios(results: list[dict], contexts: list[int]) -> dict:
    r = {(x["backend"], x["context"]): x for x in results}
    out = {}
    for c in contexts:
        ours = r.get(("m4 onnx", c))
        for other in ("transformers", "ort-genai", "m4 torch"):
            if ours and (other, c) in r:
                for k in ("decode_tok_s", "prefill_tok_s"):
                    out[f"{k} m4 onnx / {other} @{c}"] = ours[k] / r[(other, c)][k]
    if ("m4 onnx", contexts[0]) in r and ("m4 onnx", contexts[-1]) in r:
        out[f"decode_tok_s m4 onnx @{contexts[-1]} / @{contexts[0]}"] = (
            r[("m4 onnx", contexts[-1])]["decode_tok_s"] / r[("m4 onnx", contexts[0])]["decode_tok_s"])
    return out


def print_report(results: list[dict], rs: dict) -> None:
    t = Table("backend", "context", "prefill tok/s", "prefill s", "decode tok/s", title="decode benchmark")
    for x in results:
        t.add_row(x["backend"], str(x["context"]), f"{x['prefill_tok_s']:.1f}", f"{x['prefill_s']:.2f}",
                  f"{x['decode_tok_s']:.2f}")
    out = Console()
    out.print(t)
    for k, v in rs.items():
        out.print(f"{k}: {v:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs per backend and context; the best is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every backend (default: all cores)")
    ap.add_argument("--backends", nargs="+", default=None, help="a subset of: m4-onnx m4-torch transformers ort-genai")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="smoke run: demo preset, contexts 64 256, 8 tokens")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.contexts, args.new_tokens, args.repeats = "demo", [64, 256], 8, 1
    workdir = args.workdir or cache_dir() / f"bench-decode-{args.preset}"
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    if not genai:
        console.print("onnxruntime-genai is not installed (pip install onnxruntime-genai): left out")
    paths = build(workdir, args.preset, genai)
    vocab = Arch.from_dir(paths["checkpoint"]).text.vocab
    # a first prefill grows arenas and packs weights: not throughput
    warm = [int(i) for i in np.random.default_rng(1).integers(0, vocab, min(args.contexts[0], 512))]
    results = []
    for name, (load, run) in loaders(paths, args.threads).items():
        if (args.backends and name.replace(" ", "-") not in args.backends) or (name == "ort-genai" and not genai):
            continue
        console.print(f"{name}: loading")
        model = load()
        run(model, warm, 4)
        for c in args.contexts:
            ids = [int(i) for i in np.random.default_rng(c).integers(0, vocab, c)]
            # prefill: the best of --repeats; decode: the median step over all of them. On a
            # shared machine the slow runs and steps measure the neighbours.
            runs = [run(model, ids, args.new_tokens) for _ in range(args.repeats)]
            prefill_s, steps = min(r[0] for r in runs), [t for r in runs for t in r[1]]
            decode = 1 / float(np.median(steps))
            results.append({"backend": name, "context": c, "prefill_s": prefill_s, "prefill_tok_s": c / prefill_s,
                            "decode_tok_s": decode, "decode_tok_s_mean": max(len(r[1]) / sum(r[1]) for r in runs),
                            "load_avg": os.getloadavg()[0]})
            console.print(f"{name} @{c}: prefill {c / prefill_s:.1f} tok/s, decode {decode:.2f} tok/s")
        del model
        gc.collect()
    rs = ratios(results, args.contexts)
    print_report(results, rs)
    if args.json:
        info = {**machine(), "threads": args.threads, "onnxruntime": __import__("onnxruntime").__version__,
                "transformers": transformers.__version__}
        record = {"machine": info, "preset": args.preset, "new_tokens": args.new_tokens, "repeats": args.repeats,
                  "results": results, "ratios": rs}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
