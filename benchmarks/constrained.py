"""What a constraint costs, and what it changes.

Cost: decode tokens/s of the same question answered free and held to a JSON schema, side by
side in one run (alternating, median of `--repeats`), on each model given; and what a first
token pays for its constraint: a schema compiled for the first time, against one cached. The
masks' cost grows with the vocabulary, so a model whose own tokenizer is small (a random
checkpoint's) answers here with a byte-level BPE of Qwen2's size (151,646 tokens, trained on
the Python sources of this environment in about 30 s): its text is noise either way, but
each mask is computed over as many tokens as a real checkpoint's.

Effect: the shipped demo model on held-out M4-Synth motion questions (a seed it never
trained on), scored free and with `choices` up, down, left, right.

usage: python benchmarks/constrained.py demo /work/ck-0.5b /work/b05-fp32 --tokens 48 \
           --json benchmarks/results/constrained.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import m4
from m4.machine import machine
from m4.runtime.answer import guide_for
from m4.runtime.sampling import Sampling
from m4.tokenizer import build_tokenizer

QUESTION = "Describe the scene in detail."
# long enough that any model's answer fills the token budget: at least 8 objects
SCHEMA = {"type": "object", "properties": {"objects": {"type": "array", "minItems": 8, "maxItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                     "x": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["name", "x"], "additionalProperties": False}}},
    "required": ["objects"], "additionalProperties": False}
WIDE_VOCAB = 151_646
DIRECTIONS = ["up", "down", "left", "right"]


def python_sources(limit: int = 40_000_000):
    """Text for a wide tokenizer: this environment's Python sources, up to `limit` characters."""
    n = 0
    for f in sorted((Path(sys.prefix) / "lib").rglob("*.py")):
        text = f.read_text(errors="ignore")
        n += len(text)
        yield text
        if n > limit:
            return


def widen(model: m4.Model) -> None:
    """The model answers with a Qwen2-sized vocabulary (its logits are that wide already)."""
    tok = build_tokenizer(python_sources(), min(WIDE_VOCAB, model.arch.text.vocab))
    model.tokenizer, model.stop_ids = tok, model.template.stop_ids(tok)


def rate(model: m4.Model, tokens: int, sampling: Sampling) -> dict:
    stats: dict = {}
    p, pics = model.prepare(QUESTION)
    answer = model.start(p, pics, tokens, sampling, stats)
    list(answer.alone())
    return stats


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1e3


def cost(model: m4.Model, tokens: int, repeats: int) -> dict:
    free, held = [], []
    schema = Sampling().constrained(schema=SCHEMA)
    rate(model, tokens, schema)  # compiled, and the model warm
    for _ in range(repeats):
        free.append(rate(model, tokens, Sampling()))
        held.append(rate(model, tokens, schema))
    # what a first token pays for its constraint: a schema never seen (its title differs)
    # compiled, against the same one again, from the cache
    fresh = Sampling().constrained(schema={**SCHEMA, "title": f"t{time.perf_counter_ns()}"})
    new, cached = (timed(lambda: guide_for(fresh, model.tokenizer, model.backend, model.stop_ids)) for _ in "ab")
    f = statistics.median(s["decode_tok_s"] for s in free)
    h = statistics.median(s["decode_tok_s"] for s in held)
    return {"vocab": len(model.tokenizer), "free_tok_s": f, "schema_tok_s": h, "slowdown": 1 - h / f,
            "tokens": statistics.median(s["new_tokens"] for s in held),
            "compile_new_schema_ms": new, "compile_cached_schema_ms": cached}


def directions(bench: int) -> dict:
    """The demo model on held-out motion questions: accuracy free and held to the four."""
    from m4.train.synth import synth

    with tempfile.TemporaryDirectory() as d:
        synth(Path(d), n=0, bench=bench, seed=7, workers=1)
        records = [r for r in json.loads((Path(d) / "bench.json").read_text())
                   if r["metadata"]["dataset"] == "motion"]
        model = m4.load("demo", backend="torch")
        right = {"free": 0, "choices": 0}
        for r in records:
            images = [Path(d) / f for f in r["image"]]
            truth = r["conversations"][1]["value"]
            q = r["conversations"][0]["value"]
            right["free"] += model.ask(q, images=images, max_new_tokens=8).strip() == truth
            right["choices"] += model.ask(q, images=images, max_new_tokens=8, choices=DIRECTIONS) == truth
    return {"questions": len(records), **{k: v / len(records) for k, v in right.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="demo, checkpoints (torch) and bundles (ONNX Runtime)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bench", type=int, default=200, help="held-out M4-Synth samples (a tenth are motion)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows = []
    for name in a.models:
        model = m4.load(name, backend="torch" if name == "demo" else "auto")
        if model.arch.text.vocab > 4 * len(model.tokenizer):  # a random checkpoint's small tokenizer
            widen(model)
        rows.append({"model": name, "backend": model.backend.name, **cost(model, a.tokens, a.repeats)})
    table = Table("model", "backend", "vocab", "free tok/s", "schema tok/s", "slower", "compile ms",
                  "cached ms", title="decode with and without a JSON-schema constraint")
    for r in rows:
        table.add_row(r["model"], r["backend"], f"{r['vocab']:,}", f"{r['free_tok_s']:.1f}",
                      f"{r['schema_tok_s']:.1f}", f"{r['slowdown']:.1%}", f"{r['compile_new_schema_ms']:.1f}",
                      f"{r['compile_cached_schema_ms']:.2f}")
    Console().print(table)
    demo = directions(a.bench)
    Console().print(f"demo, {demo['questions']} held-out motion questions: {demo['free']:.0%} free, "
                    f"{demo['choices']:.0%} with choices up/down/left/right")
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "cost": rows, "directions": demo}, indent=2))


if __name__ == "__main__":
    main()
