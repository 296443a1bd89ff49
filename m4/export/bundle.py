"""`m4 export`: a checkpoint -> an ONNX bundle (m4/bundle_format.py says what the runtime reads).

The graphs are traced from the compact model (m4.model) with torch.onnx's dynamo exporter
at opset 18: standard ops only, which ONNX Runtime runs and TensorRT builds. Beside them,
decoder_ort.onnx: the same decoder in ONNX Runtime's fused contrib ops, which the CPU runs
(ort_graph.py). The bundle is written to a temporary directory beside OUT and moved into
place whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch.export import Dim

from m4.atomic import atomic_directory, umask
from m4.bundle_format import DTYPES, FORMAT_VERSION, MANIFEST, ORT_DECODER, file_record, is_bundle, past_names
from m4.errors import M4Error
from m4.export.graphs import DecoderGraph, VisionGraph
from m4.export.ort_graph import export_ort_decoder, runs_on_ort
from m4.model.checkpoint import load_model
from m4.model.config import Arch
from m4.model.llava import LLaVA
from m4.prompt import detect_template
from m4.resolve import resolve
from m4.tokenizer import Tokenizer
from m4.version import __version__

OPSET = 18  # TensorRT 10 parses it whole; 23's Attention and RMSNormalization it may not
# what the runtime reads beside the graphs: the tokenizer, the chat template, the image processor
CONFIG_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json")


def export_onnx(module: torch.nn.Module, args: tuple, f: Path, names: list[str], outputs: list[str],
                dynamic: tuple) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not ours to fix
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET, input_names=names,
                                    output_names=outputs, dynamic_shapes=dynamic, verbose=False)
    assert program is not None  # dynamo=True returns the program
    program.save(f)  # near protobuf's 2 GB limit, the weights go to f.data beside it


def export_vision(model: LLaVA, f: Path, dtype: torch.dtype) -> None:
    s = model.arch.vision.image_size
    export_onnx(VisionGraph(model), (torch.zeros(2, 3, s, s, dtype=dtype),), f, ["pixel_values"],
                ["image_embeds"], ({0: Dim("images")},))


def export_decoder(model: LLaVA, f: Path, dtype: torch.dtype) -> None:
    a = model.arch.text
    # example sizes above 1, or torch.export would fix them; one Dim shared by every
    # cache input keeps TensorRT's optimisation profiles to one range
    b, t, m = 2, 3, 5
    kt, v = (b, a.kv_heads, a.head_dim, m), (b, a.kv_heads, m, a.head_dim)
    past = [torch.zeros(shape, dtype=dtype) for _ in range(a.layers) for shape in (kt, v)]
    args = (torch.zeros(b, t, a.hidden, dtype=dtype), torch.tensor([2, 1]), torch.tensor([0, t - 1]), past)
    batch, cache = Dim("batch"), Dim("cache")
    dynamic = ({0: batch, 1: Dim("tokens")}, {0: batch}, {0: Dim("keep")},
               [{0: batch, 3: cache}, {0: batch, 2: cache}] * a.layers)
    export_onnx(DecoderGraph(model.text), args, f, ["inputs_embeds", "past_len", "logits_index"] + past_names(a.layers),
                ["logits", "new_keys", "new_values"], dynamic)


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
    """Export MODEL (demo, a checkpoint directory or a hub id) to the bundle OUT; its manifest."""
    if dtype not in DTYPES:
        raise M4Error(f"unknown dtype {dtype!r}: use " + " or ".join(DTYPES))
    path, out = resolve(spec, bundle=False), Path(out)
    if is_bundle(path):
        raise M4Error(f"{spec} is already a bundle; export takes a checkpoint")
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))):
        raise M4Error(f"{out} exists and is not a bundle: export replaces only bundles and empty directories")
    arch, tokenizer = Arch.from_dir(path), Tokenizer.from_dir(path)
    template = detect_template(tokenizer).name
    tdtype = getattr(torch, DTYPES[dtype])
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True)) as progress, atomic_directory(out) as tmp:
        def step(what, fn, *args):
            task = progress.add_task(what, total=1)
            result = fn(*args)
            progress.update(task, completed=1)
            return result

        model = step(f"load {path.name} ({dtype})", load_model, path, arch, tdtype)
        step("export vision.onnx", export_vision, model, tmp / "vision.onnx", tdtype)
        step("export decoder.onnx", export_decoder, model, tmp / "decoder.onnx", tdtype)
        if runs_on_ort(arch.text):
            step(f"write {ORT_DECODER}", export_ort_decoder, model, tmp / ORT_DECODER, tdtype)
        step("write embed_tokens.npy", np.save, tmp / "embed_tokens.npy",
             model.text.embed_tokens.weight.detach().numpy())
        for name in CONFIG_FILES:
            if (path / name).is_file():
                shutil.copy(path / name, tmp / name)
        for f in tmp.iterdir():  # onnx writes external data readable by its owner alone
            f.chmod(0o666 & ~umask())
        files = step("hash files", lambda: {f.name: file_record(f) for f in sorted(tmp.iterdir())})
        m = manifest(str(spec), arch, template, dtype, files)
        (tmp / MANIFEST).write_text(json.dumps(m, indent=2))
    return m
