"""What each step needs before it starts: memory and disk to export, calibrate and run a model
at each precision, from its architecture alone, and the check that stops a step that cannot
fit in one line, before it allocates.

The formulas are models, their constants measured: change a constant, not a caller.
Precisions: fp32 and fp16 bundles are float throughout; int8 and int4 bundles quantise the
decoder's linears (lm_head included; a tied table gets its own quantised copy), keep the
vision tower and the projector in fp32 (their graph runs in float32, as the CPU runs it
fastest) and the token embedding table in fp16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from m4.bundle_format import is_bundle, manifest_arch, read_manifest
from m4.errors import M4Error
from m4.machine import MEMORY_LIMIT, available_memory
from m4.model.config import Arch
from m4.resolve import resolve

PRECISIONS = ("fp32", "fp16", "int8", "int4")
DEFAULT_WINDOW = 8  # video frames in the context (m4 run --window)
TEXT_TOKENS = 512  # the question, the answer and the template around the frames
GB = 1e9

# bytes of an export beside the tensors it holds: Python, torch and onnx imported, and the
# graphs traced on the meta device (structure, no weights)
EXPORT_OVERHEAD = int(1.7 * GB)  # measured: 1.05 GB (0.5b int4) to 2.18 GB (7b int4) peak in all
# bytes of a running process beside its weights and cache: ONNX Runtime's arenas, activations
RUN_OVERHEAD = int(1.5 * GB)
# export writes a tensor at a time: the largest one as read, cast and transposed
TENSOR_COPIES = 3
QUANTISED_ROWS = 4096  # output rows quantised at a time (m4.export.weights.ROWS)
# calibration's float reference holds one decoder layer in float32 at a time, and logits
# of this many positions at once (both bundles', float32)
CALIB_POSITIONS = 512  # m4.bundle_format.PREFILL_CHUNK
CALIB_FRAMES = 4  # images in a calibration prompt at most: the frames m4.calib.data takes from a clip
GROUP = 32  # weights per float32 scale of a quantised linear
# bytes per value of each part at each precision: quantised linears carry a float32 scale per GROUP
VISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 4, "int4": 4}  # vision tower and projector
TABLE_BYTES = {"fp32": 4, "fp16": 2, "int8": 2, "int4": 2}  # the token embedding table
LINEAR_BYTES = {"fp32": 4, "fp16": 2, "int8": 1 + 4 / GROUP, "int4": 0.5 + 4 / GROUP}
# the KV cache: the ONNX backend allocates it in the bundle's float dtype (its manifest's);
# a calibrated bundle keeps its float bundle's, and m4 calibrate takes fp32 bundles
CACHE_BYTES = {"fp32": 4, "fp16": 2, "int8": 4, "int4": 4}
# the precision m4 calibrate --decoder makes (none: the decoder stays float32)
CALIBRATED = {"int8": "int8", "w8a8": "int8", "int4": "int4", "none": "fp32"}
# what a torch dtype runs a checkpoint at (m4.load's dtype: None is float32 on the CPU)
TORCH_PRECISIONS = {None: "fp32", "float32": "fp32", "float16": "fp16", "bfloat16": "fp16", "int8": "int8"}


@dataclass(frozen=True)
class Sizes:
    """Parameters of each part that a precision stores differently."""

    vision: int  # the tower's layers run, and the projector
    linears: int  # the decoder's, lm_head included, norms counted in
    table: int  # the token embedding table
    largest: int  # the decoder's largest tensor

    @classmethod
    def of(cls, arch: Arch) -> Sizes:
        p, t = arch.params(), arch.text
        table = t.vocab * t.hidden
        return cls(vision=p["vision"] + p["projector"], linears=p["decoder"] - (0 if t.tied else table),
                   table=table, largest=max(table, t.hidden * t.mlp, t.hidden * t.heads * t.head_dim))


def kv_cache(arch: Arch, precision: str, window: int = DEFAULT_WINDOW) -> int:
    tokens = window * arch.tokens_per_image + TEXT_TOKENS
    t = arch.text
    return 2 * t.layers * t.kv_heads * t.head_dim * tokens * CACHE_BYTES[precision]


def bundle_bytes(arch: Arch, precision: str) -> int:
    """A bundle on disk: the vision graph, the decoder's weights once, the embedding table."""
    s = Sizes.of(arch)
    return int(VISION_BYTES[precision] * s.vision + TABLE_BYTES[precision] * s.table
               + LINEAR_BYTES[precision] * s.linears)


def weights_run(arch: Arch, precision: str) -> int:
    """A bundle's weights in memory: vision and decoder graphs (the table is memory-mapped:
    a prompt costs its rows only)."""
    s = Sizes.of(arch)
    return int(VISION_BYTES[precision] * s.vision + LINEAR_BYTES[precision] * s.linears)


def needs(arch: Arch, step: str, precision: str, window: int = DEFAULT_WINDOW) -> int:
    """Peak bytes of `step` at `precision`: "export" (a checkpoint to a bundle), "calibrate"
    (an fp32 bundle to an int8/int4 one), "run" (a bundle on ONNX Runtime on the CPU) or
    "torch" (a checkpoint on torch on the CPU: every weight, the table too, held)."""
    if precision not in PRECISIONS:
        raise M4Error(f"unknown precision {precision!r}: use " + ", ".join(PRECISIONS))
    s = Sizes.of(arch)
    if step == "export":
        # a float tensor is held TENSOR_COPIES times whole (read, cast, transposed); a quantised
        # one QUANTISED_ROWS output rows at a time, in float32
        if precision in ("fp32", "fp16"):
            held = s.largest * LINEAR_BYTES[precision]
        else:
            held = QUANTISED_ROWS * 4 * max(arch.text.hidden, arch.text.mlp)
        return int(EXPORT_OVERHEAD + TENSOR_COPIES * held)
    if step == "calibrate":
        # the quantised bundle running, beside the float vision graph (measuring vision) or
        # then the float reference's layer, logits and a prompt's cache (m4/calib/reference.py):
        # the float decoder is never held whole
        layer = LINEAR_BYTES["fp32"] * (s.linears - s.table) / arch.text.layers  # the head aside
        logits = 2 * CALIB_POSITIONS * arch.text.vocab * 4
        beside = max(VISION_BYTES["fp32"] * s.vision, layer + logits + kv_cache(arch, "fp32", CALIB_FRAMES))
        return int(EXPORT_OVERHEAD + weights_run(arch, precision) + beside)
    if step == "run":
        return RUN_OVERHEAD + weights_run(arch, precision) + kv_cache(arch, precision, window)
    if step == "torch":  # a float tied table is lm_head too, already counted with the linears
        table = 0 if arch.text.tied and precision in ("fp32", "fp16") else TABLE_BYTES[precision] * s.table
        cache = kv_cache(arch, "fp32" if precision == "fp32" else "fp16", window)
        return int(RUN_OVERHEAD + weights_run(arch, precision) + table + cache)
    raise ValueError(step)


def plan(arch: Arch, window: int = DEFAULT_WINDOW) -> dict:
    """Every step at every precision: peak memory, and the bytes it writes."""
    steps = [{"step": "export", "precision": p, "memory": needs(arch, "export", p), "disk": bundle_bytes(arch, p)}
             for p in PRECISIONS]
    steps += [{"step": "calibrate", "precision": p, "memory": needs(arch, "calibrate", p, window),
               "disk": bundle_bytes(arch, p)} for p in ("int8", "int4")]
    steps += [{"step": "run", "precision": p, "memory": needs(arch, "run", p, window),
               "weights": weights_run(arch, p), "kv_cache": kv_cache(arch, p, window)} for p in PRECISIONS]
    return {"window": window, "kv_tokens": window * arch.tokens_per_image + TEXT_TOKENS,
            "available": available_memory(), "steps": steps}


VERBS = {"export": "exporting {} to {}", "calibrate": "calibrating {} to {}", "run": "running {} at {}",
         "torch": "running {} on torch at {}"}


def check_fits(arch: Arch, step: str, precision: str, window: int = DEFAULT_WINDOW, name: str = "this model",
               held: int = 0) -> None:
    """Raise M4Error, one line naming the need, what is available and the way out, where
    `step` at `precision` cannot fit in this machine's available memory (or M4_MEMORY_LIMIT).
    `held`: bytes the caller keeps beside the step (reuse caches), counted in."""
    have = available_memory()
    need = needs(arch, step, precision, window) + held
    if have is None or need <= have:
        return
    where = f"{MEMORY_LIMIT} allows" if os.environ.get(MEMORY_LIMIT) else "this machine has"
    caches = f" with {held / GB:.1f} GB of caches" if held else ""
    raise M4Error(f"{VERBS[step].format(name, precision)}{caches} needs {need / GB:.1f} GB and {where} "
                  f"{have / GB:.1f} GB available; {way_out(arch, step, precision, window, have - held)}"
                  + (" (or smaller caches)" if held else ""))


def bundle_precision(manifest: dict) -> str:
    """What a bundle's decoder holds: int4 or int8 where quantised, else its float dtype."""
    scheme = ((manifest.get("quantisation") or {}).get("decoder.onnx") or {}).get("scheme", "")
    return "int4" if scheme.startswith("int4") else "int8" if scheme.startswith(("int8", "w8a8")) else manifest["dtype"]


def check_model(spec: str, step: str, precision: str, window: int = DEFAULT_WINDOW) -> None:
    """check_fits for a MODEL argument, from its config.json or manifest alone: `export` a
    checkpoint, `calibrate` a bundle. A spec the step will refuse anyway (a bundle to export,
    an unknown precision) is left for the step to name."""
    path = Path(spec) if step == "calibrate" else resolve(spec, bundle=False)
    if precision not in PRECISIONS or not path.is_dir() or is_bundle(path) != (step == "calibrate"):
        return
    arch = manifest_arch(read_manifest(path)) if step == "calibrate" else Arch.from_dir(path)
    check_fits(arch, step, precision, window, spec)


OPTIONS = {"export": "m4 export --dtype", "calibrate": "m4 calibrate --decoder"}


def way_out(arch: Arch, step: str, precision: str, window: int, have: int) -> str:
    """A lower precision that fits, and for a run a smaller window where the cache weighs."""
    lower = PRECISIONS[PRECISIONS.index(precision) + 1:]
    running = step in ("run", "torch")
    fits = [p for p in lower if needs(arch, "run" if running else step, p, window) <= have]
    weighs = running and window > 1 and kv_cache(arch, precision, window) > have / 10
    smaller = " or a smaller --window" if weighs else ""
    if fits:
        need = needs(arch, "run" if running else step, fits[0], window) / GB
        what = f"m4 export --dtype {fits[0]}: running it needs" if running else f"{OPTIONS[step]} {fits[0]} needs"
        return f"use a lower precision ({what} {need:.1f} GB){smaller}"
    return f"no precision fits: use a machine with more memory{smaller}"
