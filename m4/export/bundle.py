"""`m4 export`: a checkpoint -> an ONNX bundle (m4/bundle_format.py says what the runtime reads).

The graphs are traced from the compact model's structure (m4.model, on the meta device;
trace.py) and their weights written one tensor at a time from the memory-mapped checkpoint
(weights.py), so memory stays that of the largest tensor whatever the model's size. Beside
decoder.onnx, decoder_ort.onnx: the same decoder in ONNX Runtime's fused contrib ops, which
the CPU runs (ort_graph.py); both read one weights file. The bundle is written to a
temporary directory beside OUT and moved into place whole.
"""

from __future__ import annotations

import json
import shutil
from contextlib import closing
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch.export import Dim

from m4.atomic import atomic_directory, umask
from m4.bundle_format import (DECODER_WEIGHTS, DTYPES, FORMAT_VERSION, MANIFEST, ORT_DECODER, VISION_WEIGHTS,
                              file_record, is_bundle, past_names)
from m4.errors import M4Error
from m4.export.graphs import DecoderGraph, VisionGraph
from m4.export.ort_graph import export_ort_decoder, runs_on_ort
from m4.export.tensors import NUMPY, Tensors
from m4.export.trace import OPSET, attach, trace
from m4.export.weights import BITS, Weights, quantisation_record
from m4.model.checkpoint import Checkpoint
from m4.model.config import Arch
from m4.model.llava import LLaVA
from m4.prompt import detect_template
from m4.resolve import resolve
from m4.tokenizer import Tokenizer
from m4.version import __version__

# what the runtime reads beside the graphs: the tokenizer, the chat template, the image processor
CONFIG_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json")
EXPORT_DTYPES = ("fp32", "fp16", "int8", "int4")  # int8/int4: weight-only decoder linears, float32 activations
TABLE_ROWS = 16384  # embedding rows copied at a time


def meta_inputs(*shapes, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.zeros(s, dtype=dtype, device="meta") for s in shapes]


# A graph is a function of the architecture and dtype alone (traced on the meta device): one
# traced is kept, serialized, for the process's later exports of the same shapes (a bench's
# bundles, a test session's), each given a copy of its own, since attaching weights edits it.
TRACED: dict[tuple, tuple[bytes, list[str]]] = {}


def traced(trace_graph, model: LLaVA, dtype: torch.dtype) -> tuple[onnx.ModelProto, list[str]]:
    key = (trace_graph.__name__, model.arch, dtype)
    if key not in TRACED:
        graph, names = trace_graph(model, dtype)
        TRACED[key] = graph.SerializeToString(), names
    data, names = TRACED[key]
    return onnx.load_from_string(data), list(names)


def trace_vision(model: LLaVA, dtype: torch.dtype):
    s = model.arch.vision.image_size
    return trace(VisionGraph(model), tuple(meta_inputs((2, 3, s, s), dtype=dtype)), ["pixel_values"],
                 ["image_embeds"], ({0: Dim("images")},))


def trace_decoder(model: LLaVA, dtype: torch.dtype):
    a = model.arch.text
    # example sizes above 1, or torch.export would fix them; one Dim shared by every
    # cache input keeps TensorRT's optimisation profiles to one range
    b, t, m = 2, 3, 5
    kt, v = (b, a.kv_heads, a.head_dim, m), (b, a.kv_heads, m, a.head_dim)
    past = meta_inputs(*[shape for _ in range(a.layers) for shape in (kt, v)], dtype=dtype)
    meta = torch.device("meta")
    args = (*meta_inputs((b, t, a.hidden), dtype=dtype), torch.tensor([2, 1], device=meta),
            torch.tensor([0, t - 1], device=meta), past)
    batch, cache = Dim("batch"), Dim("cache")
    dynamic = ({0: batch, 1: Dim("tokens")}, {0: batch}, {0: Dim("keep")},
               [{0: batch, 3: cache}, {0: batch, 2: cache}] * a.layers)
    return trace(DecoderGraph(model.text), args, ["inputs_embeds", "past_len", "logits_index"] + past_names(a.layers),
                 ["logits", "new_keys", "new_values"], dynamic)


def write_table(source: Checkpoint, f: Path, dtype: np.dtype) -> None:
    """embed_tokens.npy, copied a slice of rows at a time from the mapped checkpoint."""
    name = "text.embed_tokens.weight"
    shape = source.model_shape(name)
    table = np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=shape)
    for i in range(0, shape[0], TABLE_ROWS):
        table[i:i + TABLE_ROWS] = source.tensor(name, torch.float32, slice(i, i + TABLE_ROWS)).numpy()
    table.flush()
    del table


def manifest(source: str, arch: Arch, template: str, dtype: str, files: dict) -> dict:
    return {
        "format": "m4-bundle",
        "format_version": FORMAT_VERSION,
        "source": source,
        "exporter": {"m4": __version__, "torch": torch.__version__, "opset": OPSET},
        "architecture": arch.to_hf(),
        "tokens_per_image": arch.tokens_per_image,
        "template": template,
        "dtype": dtype,
        "dtypes": {**{f: dtype for f in ("vision.onnx", "decoder.onnx", ORT_DECODER) if f in files},
                   "embed_tokens.npy": dtype, "kv_cache": dtype},
        "quantisation": None,
        "calibration": None,
        "files": files,
    }


def export_bundle(spec: str, out: Path, dtype: str = "fp32", console: Console | None = None) -> dict:
    """Export MODEL (demo, a checkpoint directory or a hub id) to the bundle OUT; its manifest.
    dtype fp32/fp16: float graphs; int8/int4: float32 graphs whose decoder linears are
    weight-only quantised as they are written (no float bundle in between)."""
    if dtype not in EXPORT_DTYPES:
        raise M4Error(f"unknown dtype {dtype!r}: use " + ", ".join(EXPORT_DTYPES))
    path, out = resolve(spec, bundle=False), Path(out)
    if is_bundle(path):
        raise M4Error(f"{spec} is already a bundle; export takes a checkpoint")
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))):
        raise M4Error(f"{out} exists and is not a bundle: export replaces only bundles and empty directories")
    arch, tokenizer = Arch.from_dir(path), Tokenizer.from_dir(path)
    template = detect_template(tokenizer).name
    bits = BITS.get(dtype)
    graph_dtype = "fp32" if bits else dtype
    tdtype = getattr(torch, DTYPES[graph_dtype])
    source = Checkpoint(path, arch)
    tensors = Tensors(source, tdtype)
    model = source.model.to(device="meta", dtype=tdtype)  # structure only: traced, never run
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True)) as progress, atomic_directory(out) as tmp:
        def step(what, fn, *args):
            task = progress.add_task(what, total=1)
            result = fn(*args)
            progress.update(task, completed=1)
            return result

        quant = {}
        with closing(Weights(tmp / VISION_WEIGHTS)) as weights:
            graph, names = step("trace vision.onnx", traced, trace_vision, model, tdtype)
            step(f"write vision.onnx ({graph_dtype})", attach, graph, names, weights, tensors)
            onnx.save(graph, tmp / "vision.onnx")
        with closing(Weights(tmp / DECODER_WEIGHTS)) as weights:
            graph, names = step("trace decoder.onnx", traced, trace_decoder, model, tdtype)
            n = step(f"write decoder.onnx ({dtype})", attach, graph, names, weights, tensors, bits)
            onnx.save(graph, tmp / "decoder.onnx")
            quant["decoder.onnx"] = n
            if runs_on_ort(arch.text):
                quant[ORT_DECODER] = step(f"write {ORT_DECODER} ({dtype}, the same weights)", export_ort_decoder,
                                          model.text, arch.text, tmp / ORT_DECODER, tdtype, weights, tensors, bits)
        step("write embed_tokens.npy", write_table, source, tmp / "embed_tokens.npy",
             np.dtype(np.float16 if bits else NUMPY[tdtype]))
        for name in CONFIG_FILES:
            if (path / name).is_file():
                shutil.copy(path / name, tmp / name)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask())
        files = step("hash files", lambda: {f.name: file_record(f) for f in sorted(tmp.iterdir())})
        m = manifest(str(spec), arch, template, graph_dtype, files)
        if bits:
            m["quantisation"] = {g: quantisation_record(bits, k) for g, k in quant.items()}
            m["dtypes"]["embed_tokens.npy"] = "fp16"
        (tmp / MANIFEST).write_text(json.dumps(m, indent=2))
    return m
