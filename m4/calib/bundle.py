"""`m4 calibrate`: a float bundle + calibration data -> a quantised bundle with report.json.

The calibration samples run through the float bundle as the runtime runs them: their
pictures (preprocessed) calibrate the vision graph, their interleaved prompts (image
embeddings + text, embedded) the decoder. A share of the samples is held out and never
calibrated on; the report compares the two bundles on it (measure.py). The output has the
float bundle's layout, its m4.json recording the quantisation and the calibration, and is
written to a temporary directory and moved into place whole.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import closing
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import m4
from m4.atomic import atomic_directory
from m4.api import bundle_model
from m4.bundle_format import (DECODER_WEIGHTS, MANIFEST, ORT_DECODER, PREFILL_CHUNK, VISION_WEIGHTS, file_record,
                              is_bundle, manifest_arch, read_manifest, verify as verify_bundle, verifying)
from m4.calib import decoder as dec
from m4.calib.data import load_samples
from m4.calib.measure import answer, answers_equal, latency, measure_decoder, measure_vision
from m4.calib.reference import Reference
from m4.calib.vision import METHODS, quantize_vision
from m4.errors import M4Error
from m4.eval import evaluate, load_bench
from m4.export.weights import BITS, Weights
from m4.machine import available_memory, machine
from m4.media import preprocess
from m4.plan import bundle_precision, needs
from m4.runtime.onnx_backend import OnnxBackend
from m4.version import __version__

VISION = ("int8", "none")
DECODER = ("int8", "int4", "w8a8", "none")
GRAPHS = ("vision.onnx", "decoder.onnx")


def check(bundle: Path, out: Path, vision: str, decoder: str, method: str, samples: int) -> None:
    for what, value, allowed in (("--vision", vision, VISION), ("--decoder", decoder, DECODER),
                                 ("--method", method, tuple(METHODS))):
        if value not in allowed:
            raise M4Error(f"unknown {what} {value!r}: use " + ", ".join(allowed))
    if vision == "none" and decoder == "none":
        raise M4Error("nothing to quantise: --vision none and --decoder none")
    if samples < 2:
        raise M4Error(f"--samples {samples}: need at least 2 (one to calibrate on, one held out)")
    if not bundle.is_dir() or not is_bundle(bundle):
        raise M4Error(f"{bundle} is not a bundle directory (make one with m4 export)")
    if out.resolve() == bundle.resolve():
        raise M4Error("OUT must differ from BUNDLE: calibration writes a new bundle")
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))):
        raise M4Error(f"{out} exists and is not a bundle: calibrate replaces only bundles and empty directories")


def carried(bundle: Path, quant: dict) -> list[Path]:
    """The float bundle's files that the quantised one takes as they are: graphs left float,
    tokenizer, embeddings. Never the fused float twin of a decoder that is now quantised (the
    runtime would run it instead): weight-only schemes write a quantised twin, w8a8 none."""
    skip = (MANIFEST, "report.json", *quant, *((ORT_DECODER, DECODER_WEIGHTS) if "decoder.onnx" in quant else ()),
            *((VISION_WEIGHTS,) if "vision.onnx" in quant else ()))
    return [f for f in bundle.iterdir() if f.is_file() and not f.name.startswith(skip)]


def graph_bytes(path: Path, name: str) -> int:
    """A graph's file and the files of its external weights (a weights file two graphs
    share counts in each)."""
    g = onnx.load(str(path / name), load_external_data=False).graph
    files = {e.value for t in g.initializer for e in t.external_data if e.key == "location"}
    return sum((path / f).stat().st_size for f in {name, *files})


def calibrate(bundle: str | Path, out: str | Path, data: str, vision: str = "int8", decoder: str = "int8",
              method: str = "minmax", samples: int = 32, console: Console | None = None,
              bench: str | Path | None = None, bench_limit: int | None = None) -> dict:
    """Write the quantised bundle OUT; its report. With `bench` (LLaVA-Interleave Bench JSON,
    such as M4-Synth's), the report also has both bundles' task accuracy on it."""
    bundle, out = Path(bundle), Path(out)
    check(bundle, out, vision, decoder, method, samples)
    if bench is not None:
        load_bench(Path(bench))  # a bad bench is one line before any work
    m = read_manifest(bundle)
    if m.get("quantisation"):
        raise M4Error(f"{bundle} is already quantised: calibrate a float bundle")
    if m["dtype"] != "fp32" and (vision != "none" or decoder not in BITS):
        raise M4Error(f"{bundle} is {m['dtype']}: calibrated INT8 needs an fp32 bundle (m4 export --dtype fp32); "
                      "weight-only --decoder int4/int8 with --vision none takes an fp16 one")
    # read before any progress is drawn, so that bad data is the one line on stderr
    got = load_samples(data, samples + max(1, samples // 4))
    if len(got) < 2:
        raise M4Error(f"{data} gave {len(got)} sample; calibration needs at least 2 (one is held out)")
    held = max(1, len(got) // 5)
    cal, test = got[:-held], got[-held:]
    if vision == "int8" and not any(s.images for s in cal):
        raise M4Error(f"{data} has no images or video frames to calibrate the vision graph on (or pass --vision none)")
    # the float bundle's vision and embedding table embed the prompts; its decoder is never
    # loaded whole (the reference runs it a layer at a time, reference.py)
    if verifying():
        verify_bundle(bundle)
    ref = bundle_model(bundle, OnnxBackend(bundle, decoder=False))
    console = console or Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress, atomic_directory(out) as tmp:
        def step(what, fn, *args):
            task = progress.add_task(what, total=1)
            result = fn(*args)
            progress.update(task, completed=1)
            return result

        cal_prompts, cal_pixels = step(f"embed {len(cal)} calibration prompts", embed_samples, ref, cal)
        test_prompts, test_pixels = step(f"embed {len(test)} held-out prompts", embed_samples, ref, test)
        quant = quantise(step, m, bundle, tmp, vision, decoder, method, cal_prompts, cal_pixels)
        del cal_prompts, cal_pixels
        for f in carried(bundle, quant):
            shutil.copy(f, tmp / f.name)
        record = {"source": data, "samples": len(cal), "held_out": len(test), "method": method,
                  "tools": {"m4": __version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__}}
        write_manifest(tmp, m, str(bundle), quant, record)
        report = {"bundle": str(out), "float_bundle": str(bundle), "quantisation": quant, "calibration": record,
                  "machine": machine(), "size_bytes": sizes(bundle, tmp)}
        q = m4.load(str(tmp))
        if "vision.onnx" in quant and len(test_pixels):
            report["vision"] = step("measure vision on held-out images", measure_vision, ref, q, test_pixels)
        del ref  # the float vision graph: what follows holds the quantised bundle and a float layer
        report.update(measure(step, bundle, m["dtype"], q, quant, test, test_prompts))
        if bench is not None:
            report["task_accuracy"] = step(f"score both bundles on {bench}", task_accuracy, bundle, tmp,
                                           Path(bench), bench_limit)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        write_manifest(tmp, m, str(bundle), quant, record)
    print_report(report, Console())
    return report


def quantise(step, m: dict, bundle: Path, tmp: Path, vision: str, decoder: str, method: str,
             prompts: list[np.ndarray], pixels: np.ndarray) -> dict:
    """Write the quantised graphs into tmp; their records by file name."""
    quant = {}
    if vision == "int8":
        quant["vision.onnx"] = step(f"quantise vision.onnx (int8, {method}, {len(pixels)} images)", quantize_vision,
                                    bundle / "vision.onnx", tmp / "vision.onnx", pixels, method,
                                    attention_matmuls(bundle / "vision.onnx"))
    if decoder in ("int4", "int8"):
        with closing(Weights(tmp / DECODER_WEIGHTS)) as weights:
            for g in decoder_graphs(m):
                quant[g] = step(f"quantise {g} ({decoder} weight-only)", dec.weight_only, bundle / g, tmp / g,
                                weights, BITS[decoder])
    elif decoder == "w8a8":
        a = manifest_arch(m).text
        feeds = dec.prefill_feeds([p[:PREFILL_CHUNK] for p in prompts], a.layers, a.kv_heads, a.head_dim)
        with tempfile.TemporaryDirectory(dir=tmp) as work:
            quant["decoder.onnx"] = step(f"quantise decoder.onnx (w8a8 SmoothQuant, {method})", dec.w8a8,
                                         bundle / "decoder.onnx", tmp / "decoder.onnx", feeds, method, Path(work))
    return quant


def decoder_graphs(m: dict) -> tuple[str, ...]:
    """The decoder graphs a weight-only scheme quantises alike: decoder.onnx, and the fused
    decoder_ort.onnx that the CPU runs where the float bundle has one."""
    return ("decoder.onnx",) + ((ORT_DECODER,) if ORT_DECODER in m["files"] else ())


def sizes(bundle: Path, tmp: Path) -> dict:
    out = {g: {"float": graph_bytes(bundle, g), "quantised": graph_bytes(tmp, g)} for g in GRAPHS}
    if (tmp / ORT_DECODER).is_file():
        out[ORT_DECODER] = {"float": graph_bytes(bundle, ORT_DECODER), "quantised": graph_bytes(tmp, ORT_DECODER)}
    return {g: {**s, "ratio": s["quantised"] / s["float"]} for g, s in out.items()}


def measure(step, bundle: Path, dtype: str, q, quant: dict, test: list, prompts: list[np.ndarray]) -> dict:
    """The report's measures of the quantised bundle q's decoder and answers on the held-out
    samples, against the float bundle (of `dtype`)'s decoder run a layer at a time (Reference)."""
    r = {}
    answers = step("answer held-out prompts with the quantised bundle", answer, q, test)
    reference = Reference(bundle)
    sequences = [np.concatenate([e, reference.embed(a)]) for e, a in zip(prompts, answers)]
    hidden = step(f"run the float decoder, a layer at a time, over {len(sequences)} held-out prompts",
                  reference.hidden, sequences)
    if "decoder.onnx" in quant:
        # the graph each bundle runs here (on the CPU, decoder_ort.onnx where the bundle has it)
        graph = ORT_DECODER if getattr(q.backend, "fused", False) else "decoder.onnx"
        r["decoder"] = {"graph": graph, **step(f"measure {graph} on held-out prompts", measure_decoder, reference,
                                                hidden, q, prompts)}
        r["decoder"].update(step("time both decoders", timed_decoders, bundle, dtype, q, prompts[0]))
    r["end_to_end"] = {"answers_equal": step("compare the held-out answers", answers_equal, reference, hidden,
                                             prompts, answers, q.stop_ids)}
    return r


def timed_decoders(bundle: Path, dtype: str, q, embeds: np.ndarray) -> dict:
    """Both decoders' latency, where the float bundle fits in memory beside the quantised one
    (the one step that loads it whole); else why not."""
    arch = q.arch
    need = needs(arch, "run", dtype) + needs(arch, "run", bundle_precision(q.backend.manifest))
    have = available_memory()
    if have is not None and need > have:
        return {"latency": f"not measured: both bundles side by side need {need / 1e9:.1f} GB, "
                           f"{have / 1e9:.1f} GB available"}
    return latency(m4.load(str(bundle), verify=False), q, embeds)


def task_accuracy(float_bundle: Path, quantised: Path, bench: Path, limit: int | None) -> dict:
    """Both bundles scored on a bench (m4 eval): accuracies, and the quantised one's change in points."""
    keep = ("overall", "by_scenario", "by_task", "n", "chance")
    f, q = (evaluate(str(b), bench, limit=limit) for b in (float_bundle, quantised))
    return {"bench": str(bench), "float": {k: f[k] for k in keep}, "quantised": {k: q[k] for k in keep},
            "delta_points": 100 * (q["overall"] - f["overall"])}


def embed_samples(model, samples: list) -> tuple[list[np.ndarray], np.ndarray]:
    """Each sample's decoder input embeddings (through the float bundle), and all pictures preprocessed."""
    prompts, pictures = [], []
    for s in samples:
        p, pics = model.prepare(s.text, None if s.video else s.images, s.images if s.video else None, None,
                                 s.patches)
        prompts.append(model.embed(p, pics))
        pictures += pics
    size = model.arch.vision.image_size
    return prompts, preprocess(pictures, model.processing) if pictures else np.zeros((0, 3, size, size), np.float32)


def attention_matmuls(f: Path) -> list[str]:
    """The MatMuls of two activations (attention's scores and mix): kept float in the vision
    graph, which measured as accurate and faster than quantising them."""
    g = onnx.load(str(f), load_external_data=False).graph
    weights = {i.name for i in g.initializer}
    return [n.name for n in g.node if n.op_type == "MatMul" and not weights & set(n.input)]


def write_manifest(tmp: Path, m: dict, source: str, quant: dict, record: dict) -> None:
    files = {f.relative_to(tmp).as_posix(): file_record(f) for f in sorted(tmp.iterdir()) if f.is_file()
             and f.name != MANIFEST}
    dtypes = {f: d for f, d in m["dtypes"].items() if f in files}
    (tmp / MANIFEST).write_text(json.dumps({**m, "source": source, "dtypes": dtypes, "quantisation": quant or None,
                                            "calibration": record if quant else None, "files": files}, indent=2))


def print_report(r: dict, console: Console) -> None:
    """One column per quantised graph, one row per measure."""
    graphs = [g for g in ("vision", "decoder") if g in r]
    t = Table("held-out inputs", *[f"{g} ({r['quantisation'][g + '.onnx']['scheme']})" for g in graphs],
              title=f"{r['bundle']} vs the float bundle")
    rows = {"cosine (min)": lambda d: f"{d['cosine']:.4f} ({d['cosine_min']:.4f})",
            "max abs error": lambda d: f"{d['max_abs_error']:.3g} (of {d['max_abs_ref']:.3g})",
            "logit KL": lambda d: f"{d['logit_kl']:.2e}" if "logit_kl" in d else "-",
            "token agreement": lambda d: f"{d['token_agreement']:.1%}" if "token_agreement" in d else "-"}
    for name, cell in rows.items():
        t.add_row(name, *[cell(r[g]) for g in graphs])
    t.add_row("size", *[size(r["size_bytes"][r[g].get("graph", g + ".onnx")]) for g in graphs])
    t.add_row("latency (this CPU)", *[speed(r[g]) for g in graphs])
    console.print(t)
    if "end_to_end" in r:
        console.print(f"held-out answers identical to the float bundle's: {r['end_to_end']['answers_equal']:.0%} "
                      f"of {r['calibration']['held_out']}")
    if "task_accuracy" in r:
        a = r["task_accuracy"]
        console.print(f"task accuracy on {a['bench']} ({a['float']['n']} samples): float {a['float']['overall']:.3f}, "
                      f"quantised {a['quantised']['overall']:.3f} ({a['delta_points']:+.1f} points; "
                      f"chance {a['float']['chance']['overall']:.3f})")


def size(s: dict) -> str:
    return f"{s['float'] / 1e6:.1f} -> {s['quantised'] / 1e6:.1f} MB ({s['ratio']:.0%})"


def speed(d: dict) -> str:
    if "latency" in d:
        return d["latency"]
    if "decode_tok_s" in d:
        x = d["decode_tok_s"]
        return f"decode {x['float']:.0f} -> {x['quantised']:.0f} tok/s ({x['speedup']:.2f}x)"
    x = d["latency_ms"]
    return f"{x['float']:.1f} -> {x['quantised']:.1f} ms / {x['batch']} images ({x['speedup']:.2f}x)"
