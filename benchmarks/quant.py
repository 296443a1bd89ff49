"""Quantised bundles against their float bundle, side by side in one run.

Per preset (seeded random weights, no download): export the fp32 bundle, `m4 calibrate` it
on the demo scene three ways (vision INT8 each time; decoder int8, int4 and w8a8), then
measure here, float and quantised runs alternating:
- vision: embedding cosine on held-out frames (demo scenes calibration never saw), ms per
  call at 1 and 8 images and the speedup (goals: cosine >= 0.99, INT8 >= 1.3x);
- decoder: size against the fp32 decoder, as whole graph files and as the linear weights
  alone (goals: INT4 <= 20%, INT8 <= 35%); greedy-token agreement and logit KL on the
  calibration's held-out prompts (report.json); decode tok/s after a --context prompt.
`--large P` adds a preset too big to calibrate end to end on a small CPU (0.5b): its vision
tower INT8 (calibrated on demo frames) and its decoder INT4/INT8 weight-only, measured the same way.

    python benchmarks/quant.py [--presets tiny demo] [--large 0.5b] [--context 256]
                               [--repeats 7] [--workdir DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

import m4
from m4.bundle_format import manifest_arch, read_manifest
from m4.calib.bundle import (attention_matmuls, calibrate, carried, decoder_graphs, embed_samples, graph_bytes,
                             write_manifest)
from m4.calib.data import demo_samples
from m4.calib.decoder import weight_only
from m4.calib.measure import ANSWER_TOKENS, decoding, measure_decoder
from m4.calib.vision import OPS, quantize_vision
from m4.export.bundle import export_bundle
from m4.machine import machine
from m4.media import DemoScene, preprocess
from m4.model.checkpoint import random_checkpoint
from m4.resolve import cache_dir

console = Console(stderr=True)
DECODERS = ("int8", "int4", "w8a8")


def held_out_frames(n: int) -> list[np.ndarray]:
    """Frames of demo scenes calibration never reads (it takes seeds from 0 up)."""
    return [DemoScene(seed=1000 + i).frame(10 * i % 100) for i in range(n)]


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn `repeats` times after one warm-up."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def vision_numbers(ref, quant, pixels: np.ndarray, repeats: int) -> dict:
    a, r = quant.backend.encode_images(pixels), ref.backend.encode_images(pixels)
    cos = (a * r).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(r, axis=-1)
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "max_abs_error": float(np.abs(a - r).max()),
           "held_out_images": len(pixels)}
    for batch in (1, 8):
        x = np.resize(pixels, (batch,) + pixels.shape[1:])
        t = alternate({"float": lambda: ref.backend.encode_images(x), "int8": lambda: quant.backend.encode_images(x)},
                      repeats)
        out[f"ms_batch{batch}"] = {"float": t["float"] * 1e3, "int8": t["int8"] * 1e3, "speedup": t["float"] / t["int8"]}
    return out


def vision_variants(fb: Path, work: Path, samples: int, pixels: np.ndarray, repeats: int) -> dict:
    """Which ops to keep float, measured: m4's choice against quantising more or less."""
    ref = m4.load(fb)
    _, cal = embed_samples(ref, demo_samples(samples))
    g = onnx.load(str(fb / "vision.onnx"), load_external_data=False).graph
    attention = attention_matmuls(fb / "vision.onnx")
    projector_out = [n.name for n in g.node if n.op_type == "MatMul" and n.name not in attention][-1]
    variants = {"m4: linear layers int8; patch embedding, attention matmuls, norms, softmax float": (attention, OPS),
                "attention matmuls int8 too": ([], OPS),
                "LayerNormalization and Softmax int8 too": (attention, OPS + ("LayerNormalization", "Softmax")),
                "projector output layer float too": (attention + [projector_out], OPS),
                "patch embedding (Conv) int8 too": (attention, OPS + ("Conv",))}
    out = {}
    for k, (exclude, ops) in variants.items():
        qv = work / f"vision-{len(out)}"
        qv.mkdir(exist_ok=True)
        link_bundle(fb, qv, {"vision.onnx": quantize_vision(fb / "vision.onnx", qv / "vision.onnx", cal, "minmax",
                                                            exclude, ops)})
        out[k] = vision_numbers(ref, m4.load(qv), pixels, repeats)
    return out


def linear_weight_bytes(f: Path) -> int:
    """Bytes of the linear layers' weights as stored: fp32 MatMul weights, MatMulNBits'
    packed weights and scales, or the int8 weights and scales of Q/DQ MatMuls."""
    g = onnx.load(str(f)).graph
    sizes = {i.name: len(i.raw_data) for i in g.initializer}
    dq = {n.output[0]: n.input for n in g.node if n.op_type == "DequantizeLinear"}
    total = 0
    for n in g.node:
        if n.op_type == "MatMulNBits":
            total += sum(sizes.get(x, 0) for x in n.input[1:])
        elif n.op_type == "MatMul":
            total += sizes.get(n.input[1], 0) + sum(sizes.get(x, 0) for x in dq.get(n.input[1], ()))
    return total


def decoder_numbers(ref, quant, report: dict, context: int, repeats: int, f_ref: Path, f_quant: Path) -> dict:
    e = np.random.default_rng(0).normal(0, 1, (context, ref.arch.text.hidden)).astype(np.float32) * 0.02
    t = alternate({"float": lambda: decoding(ref.backend, e)(), "quant": lambda: decoding(quant.backend, e)()},
                  repeats)
    n = ANSWER_TOKENS  # decoding's steps
    d = report["decoder"]
    return {"size_ratio_graph": graph_bytes(f_quant.parent, f_quant.name) / graph_bytes(f_ref.parent, f_ref.name),
            "size_ratio_linear_weights": linear_weight_bytes(f_quant) / linear_weight_bytes(f_ref),
            "token_agreement": d["token_agreement"], "logit_kl": d["logit_kl"], "logit_cosine": d["cosine"],
            "decode_tok_s": {"context": context, "float": n / t["float"], "quantised": n / t["quant"],
                             "speedup": t["float"] / t["quant"]}}


def preset_run(preset: str, work: Path, samples: int, context: int, repeats: int) -> dict:
    ck, fb = work / preset / "checkpoint", work / preset / "float"
    if not (ck / "config.json").is_file():
        random_checkpoint(preset, ck)
    if not (fb / "m4.json").is_file():
        export_bundle(str(ck), fb, console=console)
    ref = m4.load(fb)
    pixels = preprocess(held_out_frames(8), ref.arch.vision.image_size)
    out = {"preset": preset, "decoders": {}}
    for d in DECODERS:
        qb = work / preset / f"int8-{d}"
        console.print(f"[bold]{preset}: calibrate vision int8 + decoder {d}")
        report = calibrate(fb, qb, "demo", "int8", d, "minmax", samples, console=console)
        q = m4.load(qb)
        if "vision" not in out:
            out["vision"] = vision_numbers(ref, q, pixels, repeats)
            out["vision"]["report"] = report["vision"]
        out["decoders"][d] = decoder_numbers(ref, q, report, context, repeats, fb / "decoder.onnx", qb / "decoder.onnx")
        out["decoders"][d]["answers_equal"] = report["end_to_end"]["answers_equal"]
    out["vision_variants"] = vision_variants(fb, work / preset, samples, pixels, repeats)
    return out


def large_run(preset: str, work: Path, context: int, repeats: int) -> dict:
    """A big preset without calibrate's end-to-end prompts (minutes each on a small CPU):
    the vision tower on demo frames, the decoder weight-only on text prompts."""
    ck, fb = work / preset / "checkpoint", work / preset / "float"
    if not (ck / "config.json").is_file():
        console.print(f"random {preset} checkpoint -> {ck}")
        random_checkpoint(preset, ck)
    if not (fb / "m4.json").is_file():
        export_bundle(str(ck), fb, console=console)
    size = manifest_arch(read_manifest(fb)).vision.image_size
    out = {"preset": preset, "decoders": {}}
    qv = work / preset / "vision-int8"
    if not (qv / "m4.json").is_file():  # minutes: kept in --workdir like the float bundle
        # no session open meanwhile: ORT's calibration of SigLIP-so400m alone takes ~10 GB
        cal = preprocess([p for x in demo_samples(4) for p in x.images], size)
        qv.mkdir(exist_ok=True)
        console.print(f"{preset}: quantise the vision tower on {len(cal)} demo frames")
        rec = quantize_vision(fb / "vision.onnx", qv / "vision.onnx", cal, "minmax",
                              attention_matmuls(fb / "vision.onnx"))
        link_bundle(fb, qv, {"vision.onnx": rec})
    ref, q = m4.load(fb), m4.load(qv)
    out["vision"] = vision_numbers(ref, q, preprocess(held_out_frames(4), size), max(3, repeats // 2))
    prompts = [ref.embed(ref.prompt(t), []) for t in ("Describe the scene in detail.", "What is the capital of France?",
                                                      "Count the red squares, then the blue circles.")]
    for d in ("int8", "int4"):
        qd = work / preset / d
        qd.mkdir(exist_ok=True)
        console.print(f"{preset}: decoder {d} weight-only")
        graphs = decoder_graphs(json.loads((fb / "m4.json").read_text()))  # the fused CPU graph too
        link_bundle(fb, qd, {g: weight_only(fb / g, qd / g, int(d[3:])) for g in graphs})
        q = m4.load(qd)
        report = {"decoder": measure_decoder(ref, q, prompts)}
        out["decoders"][d] = decoder_numbers(ref, q, report, context, repeats, fb / "decoder.onnx", qd / "decoder.onnx")
    return out


def link_bundle(src: Path, dst: Path, quant: dict) -> None:
    """dst: the quantised graphs written there, every other file of src hard-linked in
    (external weights copied: onnx refuses to read a .data file with several links)."""
    for f in carried(src, quant):
        if not (dst / f.name).exists():
            (shutil.copy if f.suffix == ".data" else os.link)(f, dst / f.name)
    m = json.loads((src / "m4.json").read_text())
    write_manifest(dst, m, str(src), quant, {"source": "demo", "benchmark": "benchmarks/quant.py"})


def print_table(result: dict) -> None:
    m = result["machine"]
    c = Console()
    v = Table("preset", "cosine (min)", "ms, 1 image: fp32 -> int8", "ms, 8 images: fp32 -> int8",
              title=f"vision INT8 vs fp32, held-out frames; {m['cpu']}, {m['cores']} cores")
    for r in result["runs"]:
        x = r["vision"]
        v.add_row(r["preset"], f"{x['cosine']:.4f} ({x['cosine_min']:.4f})",
                  *[f"{x[k]['float']:.1f} -> {x[k]['int8']:.1f} ({x[k]['speedup']:.2f}x)" for k in ("ms_batch1", "ms_batch8")])
    c.print(v)
    w = Table("preset", "vision ops", "cosine (min)", "ms, 8 images: fp32 -> int8", title="what stays float, measured")
    for r in result["runs"]:
        for k, x in r.get("vision_variants", {}).items():
            w.add_row(r["preset"], k, f"{x['cosine']:.4f} ({x['cosine_min']:.4f})",
                      f"{x['ms_batch8']['float']:.1f} -> {x['ms_batch8']['int8']:.1f} ({x['ms_batch8']['speedup']:.2f}x)")
    c.print(w)
    d = Table("preset", "decoder", "size: graph / linear", "agreement, KL", "decode tok/s",
              title="decoder vs fp32: size, greedy agreement on held-out prompts, decode rate")
    for r in result["runs"]:
        for k, x in r["decoders"].items():
            rate = x["decode_tok_s"]
            d.add_row(r["preset"], k, f"{x['size_ratio_graph']:.0%} / {x['size_ratio_linear_weights']:.0%}",
                      f"{x['token_agreement']:.1%}, {x['logit_kl']:.1e}",
                      f"{rate['float']:.0f} -> {rate['quantised']:.0f} ({rate['speedup']:.2f}x)")
    c.print(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="*", default=["tiny", "demo"])
    p.add_argument("--large", nargs="*", default=[], help="presets measured without end-to-end calibration (0.5b)")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=cache_dir() / "bench-quant")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/quant-PRESETS.json")
    a = p.parse_args()
    a.json = a.json or Path(f"benchmarks/results/quant-{'-'.join(a.presets + a.large)}.json")
    load = os.getloadavg()
    result = {"machine": {**machine(), "load_before": load},
              "goals": {"vision_cosine": 0.99, "vision_int8_speedup": 1.3, "int4_size_ratio": 0.20,
                        "int8_size_ratio": 0.35},
              "runs": []}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    for run, x in [(preset_run, x) for x in a.presets] + [(large_run, x) for x in a.large]:
        result["runs"].append(run(x, a.workdir, a.samples, a.context, a.repeats) if run is preset_run
                              else run(x, a.workdir, a.context, a.repeats))
        result["machine"]["load_after"] = os.getloadavg()
        a.json.write_text(json.dumps(result, indent=2))  # after each preset: a late failure keeps the rest
    print_table(result)


if __name__ == "__main__":
    main()
