"""Prefill and decode tokens/s of one decoder six ways, side by side in one run: m4's ONNX
Runtime backend, m4's torch backend, transformers `generate`, and the decoder that
onnxruntime-genai's model builder makes from the same weights (fp32, CPU); then INT4: m4's
ONNX Runtime backend on the bundle `m4 calibrate --decoder int4` makes from the float one,
and genai's builder at `-p int4` (both MatMulNBits, blocks of 32, accuracy level 4).

The model is a preset's architecture with seeded random weights (no download): a LLaVA
checkpoint for m4 and its Qwen2 decoder as a transformers Qwen2ForCausalLM for the other
two. Every backend prefills the same random prompt of `context` tokens, then decodes
`--new-tokens` greedily. Prefill: the fastest of `--repeats` runs. Decode tokens/s: one
over the median step (the steps after the first token, of all repeats), robust to a
neighbour's burst on a shared machine; `decode_tok_s_mean` is the best run's mean rate.
The run also measures the machine's memory read bandwidth, and from it the roofline of
decode (every fp32 weight and the filled cache read once a token), and each float backend's
share of it. Then pairs run their decode steps interleaved one by one in one process (m4 torch
against transformers; m4 onnx against onnxruntime-genai, fp32 and INT4; m4 onnx INT4 against
fp32): the ratio that holds on a shared machine.

    python benchmarks/decode.py [--preset 0.5b] [--contexts 512 4096] [--new-tokens 32]
                                [--repeats 2] [--threads N] [--workdir DIR] [--json out.json] [--quick]

Artifacts (checkpoint, bundle and its INT4 bundle, Qwen2 directory, genai models) are built
once in --workdir, each only when a chosen backend runs on it (NEEDS).
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

from m4.bench import cached_bundle
from m4.machine import machine
from m4.model.checkpoint import Checkpoint, random_checkpoint
from m4.model.config import Arch
from m4.resolve import cache_dir
from m4.runtime.onnx_backend import OnnxBackend
from m4.runtime.torch_backend import TorchBackend

console = Console(stderr=True)


# -- artifacts --------------------------------------------------------------------------

# what each backend runs on, beside the checkpoint (which gives every backend its prompts)
NEEDS = {"m4 onnx": {"bundle"}, "m4 torch": set(), "transformers": {"qwen2"}, "ort-genai": {"qwen2", "genai"},
         "m4 onnx int4": {"bundle", "bundle-int4"}, "ort-genai int4": {"qwen2", "genai-int4"}}


def build(workdir: Path, preset: str, backends: list[str]) -> dict[str, Path]:
    """The artifacts `backends` run on, each built once."""
    paths = {k: workdir / k for k in ("checkpoint", "bundle", "bundle-int4", "qwen2", "genai", "genai-int4")}
    need = set().union(*(NEEDS[b] for b in backends))
    float_model(workdir, preset, bundle="bundle" in need)
    q, f = paths["bundle-int4"] / "m4.json", paths["bundle"] / "m4.json"
    if "bundle-int4" in need and (not q.is_file() or q.stat().st_mtime < f.stat().st_mtime):
        console.print(f"m4 calibrate --decoder int4 -> {paths['bundle-int4']}")
        subprocess.run([sys.executable, "-m", "m4", "calibrate", str(paths["bundle"]), str(paths["bundle-int4"]),
                        "--data", "demo", "--vision", "none", "--decoder", "int4", "--samples", "2"], check=True,
                       stdout=subprocess.DEVNULL)
    if "qwen2" in need and not (paths["qwen2"] / "config.json").is_file():
        console.print(f"its decoder as a transformers Qwen2ForCausalLM -> {paths['qwen2']}")
        save_qwen2(paths["checkpoint"], paths["qwen2"])
    for precision, key, extra in (("fp32", "genai", []), ("int4", "genai-int4", ["accuracy_level=4", "block_size=32"])):
        if key in need and not (paths[key] / "genai_config.json").is_file():
            console.print(f"onnxruntime-genai model builder ({precision}, cpu) -> {paths[key]}")
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(paths["qwen2"]),
                            "-o", str(paths[key]), "-p", precision, "-e", "cpu", "-c", str(workdir / "genai-cache"),
                            "--extra_options", "prune_lm_head=true", *extra], check=True, stdout=subprocess.DEVNULL)
    return paths


def float_model(workdir: Path, preset: str, bundle: bool = True) -> tuple[Path, Path]:
    """The preset's random checkpoint and (unless `bundle` is False) its fp32 bundle in
    `workdir` (checkpoint/, bundle/), built once; other benchmarks share them through this."""
    checkpoint = workdir / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        console.print(f"random {preset} checkpoint -> {checkpoint}")
        random_checkpoint(preset, checkpoint)
    if bundle:
        cached_bundle(str(checkpoint), workdir / "bundle")  # exported again when m4's export changed
    return checkpoint, workdir / "bundle"


def save_qwen2(checkpoint: Path, out: Path) -> None:
    """The LLaVA checkpoint's decoder, weights and all, in transformers' Qwen2 layout."""
    tc = dict(Arch.from_dir(checkpoint).to_hf()["text_config"])
    del tc["model_type"]
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**tc))
    source = Checkpoint(checkpoint, Arch.from_dir(checkpoint))
    weights = {("lm_head." + k[len("text.lm_head."):]) if k.startswith("text.lm_head.") else "model." + k[5:]: w
               for k, w in ((k, source.tensor(k)) for k in source.where) if k.startswith("text.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied: lm_head is embed
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((checkpoint / f).read_bytes())


# -- one backend each: (prefill seconds, decode tokens/s) -------------------------------

def m4_start(b, ids: list[int], n: int):
    """Prefill `ids`; a function that decodes the next greedy token (picked by the backend,
    as the runtime's answers are)."""
    cache = b.new_cache(len(ids) + n)
    state = {"token": int(b.forward(b.embed_tokens(ids), 0, cache)[-1].argmax()), "pos": len(ids)}

    def step():
        logits = b.decode(b.embed_tokens([state["token"]]), [state["pos"]], [cache])
        state["token"] = int(logits.argmax(-1).tolist()[0])
        state["pos"] += 1
    return step


def hf_start(model, ids: list[int], n: int):
    """transformers' forward with its own cache, as generate() steps it."""
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
    state = {"cache": out.past_key_values, "token": int(out.logits[0, -1].argmax())}

    def step():
        with torch.inference_mode():
            out = model(torch.tensor([[state["token"]]]), past_key_values=state["cache"], use_cache=True)
        state["cache"], state["token"] = out.past_key_values, int(out.logits[0, -1].argmax())
    return step


def genai_start(model, ids: list[int], n: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)  # the prefill forward
    gen.generate_next_token()  # picks the first token from the prefill's logits
    return gen.generate_next_token  # a forward each


def timed(start):
    """A (model, ids, n) -> (prefill seconds, decode step seconds) runner from a starter."""
    def run(model, ids: list[int], n: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        step = start(model, ids, n)
        times = [time.perf_counter()]
        for _ in range(n - 1):
            step()
            times.append(time.perf_counter())
        return times[0] - t0, list(np.diff(times))
    return run


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


def loaders(paths: dict[str, Path], threads: int):
    """name -> (load, run); each is loaded, measured at every context and freed in turn."""
    arch = Arch.from_dir(paths["checkpoint"])
    torch.set_num_threads(threads)

    def load_genai(key: str):
        import onnxruntime_genai as og

        # the builder leaves the thread count to genai, which runs one: give it ours
        f = paths[key] / "genai_config.json"
        config = json.loads(f.read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        f.write_text(json.dumps(config, indent=4))
        return og.Model(str(paths[key]))

    return {
        "m4 onnx": (lambda: OnnxBackend(paths["bundle"], "cpu", threads), timed(m4_start)),
        "m4 torch": (lambda: TorchBackend(paths["checkpoint"], arch, "cpu"), timed(m4_start)),
        "transformers": (lambda: transformers.Qwen2ForCausalLM.from_pretrained(paths["qwen2"]).eval(), hf_generate),
        "ort-genai": (lambda: load_genai("genai"), timed(genai_start)),
        "m4 onnx int4": (lambda: OnnxBackend(paths["bundle-int4"], "cpu", threads), timed(m4_start)),
        "ort-genai int4": (lambda: load_genai("genai-int4"), timed(genai_start)),
    }


STARTS = {"m4 onnx": m4_start, "m4 torch": m4_start, "transformers": hf_start, "ort-genai": genai_start,
          "m4 onnx int4": m4_start, "ort-genai int4": genai_start}
ONNX = ("m4 onnx", "ort-genai", "m4 onnx int4", "ort-genai int4")


def head_to_head(paths: dict[str, Path], contexts: list[int], n: int, pair: tuple[str, str],
                 threads: int) -> list[dict]:
    """Two backends loaded together, their decode steps alternating one by one after the same
    prompt: a neighbour's burst lands on both, so the ratio holds on a shared machine where
    runs one after the other drift. ONNX Runtime gets one thread: its pool threads spin-wait
    after a run and would take the cores of the session that runs next."""
    load = loaders(paths, 1 if any(k in ONNX for k in pair) else threads)
    both = {k: (load[k][0](), STARTS[k]) for k in pair}
    first, second = pair
    out = []
    for c in contexts:
        ids = prompt(paths, c)
        steps = {k: start(model, ids, n) for k, (model, start) in both.items()}
        times = {k: [] for k in steps}
        for _ in range(n - 1):
            for k, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        out.append({"context": c, "decode_step_ms": ms, f"{first} / {second}": ms[second] / ms[first]})
        console.print(f"interleaved @{c}: {first} {ms[first]:.1f} ms, {second} {ms[second]:.1f} ms a step")
        del steps
        gc.collect()
    return out


def roofline(arch: Arch, contexts: list[int], threads: int) -> dict:
    """Decode's physical limit here: a step reads every decoder weight (the tied lm_head is
    the embedding table) and the filled cache once, so tokens/s <= read bandwidth / bytes.
    Bandwidth is measured as torch's sum over 1 GiB with the backends' threads."""
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    x.sum()
    best = min(timeit(x.sum) for _ in range(5))
    t = arch.text
    weights = 4 * (arch.params()["decoder"] - (0 if t.tied else t.vocab * t.hidden))  # fp32; one embedding row
    gbps = x.numel() * 4 / best / 1e9
    return {"read_GBps": gbps, "weight_bytes": weights,
            "decode_tok_s": {str(c): gbps * 1e9 / (weights + c * arch.kv_bytes_per_token(4)) for c in contexts}}


def timeit(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def prompt(paths: dict[str, Path], context: int) -> list[int]:
    vocab = Arch.from_dir(paths["checkpoint"]).text.vocab
    return [int(i) for i in np.random.default_rng(context).integers(0, vocab, context)]


# -- report -----------------------------------------------------------------------------

def ratios(results: list[dict], contexts: list[int], roof: dict) -> dict:
    r = {(x["backend"], x["context"]): x for x in results}
    out = {f"decode_tok_s {x['backend']} / roofline @{x['context']}":
           x["decode_tok_s"] / roof["decode_tok_s"][str(x["context"])] for x in results if "int4" not in x["backend"]}
    for c in contexts:
        for mine, others in (("m4 onnx", ("transformers", "ort-genai", "m4 torch")),
                             ("m4 onnx int4", ("ort-genai int4", "m4 onnx"))):
            ours = r.get((mine, c))
            for other in others:
                if ours and (other, c) in r:
                    for k in ("decode_tok_s", "prefill_tok_s"):
                        out[f"{k} {mine} / {other} @{c}"] = ours[k] / r[(other, c)][k]
    if ("m4 onnx", contexts[0]) in r and ("m4 onnx", contexts[-1]) in r:
        out[f"decode_tok_s m4 onnx @{contexts[-1]} / @{contexts[0]}"] = (
            r[("m4 onnx", contexts[-1])]["decode_tok_s"] / r[("m4 onnx", contexts[0])]["decode_tok_s"])
    return out


def print_report(results: list[dict], rs: dict, h2h: list[dict], roof: dict) -> None:
    out = Console()
    out.print(f"memory read bandwidth {roof['read_GBps']:.1f} GB/s, decoder weights {roof['weight_bytes'] / 1e9:.2f} GB: "
              + ", ".join(f"decode <= {v:.1f} tok/s @{c}" for c, v in roof["decode_tok_s"].items()))
    t = Table("backend", "context", "prefill tok/s", "prefill s", "decode tok/s", title="decode benchmark")
    for x in results:
        t.add_row(x["backend"], str(x["context"]), f"{x['prefill_tok_s']:.1f}", f"{x['prefill_s']:.2f}",
                  f"{x['decode_tok_s']:.2f}")
    out.print(t)
    for k, v in rs.items():
        out.print(f"{k}: {v:.2f}x")
    for x in h2h:
        name = next(k for k in x if " / " in k)
        out.print(f"decode {name} @{x['context']}, steps interleaved: {x[name]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs per backend and context; the best is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every backend (default: all cores)")
    ap.add_argument("--backends", nargs="+", default=None, help="a subset of: m4-onnx m4-torch transformers ort-genai m4-onnx-int4 ort-genai-int4")
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
    # those asked for (default: all) that can run here
    backends = [b for b in NEEDS if (not args.backends or b.replace(" ", "-") in args.backends)
                and (genai or not b.startswith("ort-genai"))]
    paths = build(workdir, args.preset, backends)
    vocab = Arch.from_dir(paths["checkpoint"]).text.vocab
    # a first prefill grows arenas and packs weights: not throughput
    warm = [int(i) for i in np.random.default_rng(1).integers(0, vocab, min(args.contexts[0], 512))]
    results = []
    for name, (load, run) in loaders(paths, args.threads).items():
        if name not in backends:
            continue
        console.print(f"{name}: loading")
        model = load()
        run(model, warm, 4)
        for c in args.contexts:
            ids = prompt(paths, c)
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
    roof = roofline(Arch.from_dir(paths["checkpoint"]), args.contexts, args.threads)
    rs = ratios(results, args.contexts, roof)
    pairs = [("m4 onnx", "ort-genai"), ("m4 onnx int4", "ort-genai int4")] if genai else []
    pairs += [("m4 torch", "transformers"), ("m4 onnx int4", "m4 onnx")]
    h2h = [x for pair in pairs if all(b in backends for b in pair)
           for x in head_to_head(paths, args.contexts, args.new_tokens, pair, args.threads)]
    print_report(results, rs, h2h, roof)
    if args.json:
        info = {**machine(), "threads": args.threads, "onnxruntime": __import__("onnxruntime").__version__,
                "transformers": transformers.__version__}
        record = {"machine": info, "preset": args.preset, "new_tokens": args.new_tokens, "repeats": args.repeats,
                  "results": results, "ratios": rs, "roofline": roof, "interleaved": h2h}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
