"""The bundle manifest, `m4.json`: what a bundle holds and how to read it.

Plain JSON and the standard library only: the ONNX runtime and `m4 info` read it on
machines without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from m4.errors import M4Error
from m4.model.config import Arch

MANIFEST = "m4.json"
FORMAT_VERSION = 1
# ONNX element types of the graphs' floating inputs, by the manifest's dtype names
DTYPES = {"fp32": "float32", "fp16": "float16"}


# decoder.onnx's twin for ONNX Runtime on the CPU (m4/export/ort_graph.py), when the manifest
# lists it; a quantised bundle runs its own decoder.onnx
ORT_DECODER = "decoder_ort.onnx"


def past_names(layers: int) -> list[str]:
    """The decoder graphs' cache inputs, in order: each layer's key, then its value."""
    return [f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """decoder_ort.onnx's cache outputs: the same buffers as its inputs, written in place."""
    return [f"present_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]


def is_bundle(path: Path) -> bool:
    """A directory with m4.json, or with ONNX files but no manifest (a broken bundle)."""
    return (path / MANIFEST).is_file() or any(path.glob("*.onnx"))


def file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def read_manifest(path: Path) -> dict:
    """m4.json, checked: known version, and every file it lists present at its size
    (a cheap check that catches truncated copies; sha256 is there for `m4 info` and tools)."""
    f = path / MANIFEST
    if not f.is_file():
        raise M4Error(f"{path} has ONNX files but no {MANIFEST}: not a complete bundle (re-run m4 export)")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise M4Error(f"cannot read {f}: {e}") from None
    version = m.get("format_version") if isinstance(m, dict) else None
    if version != FORMAT_VERSION:
        raise M4Error(f"{f}: bundle format version {version!r} is not one this m4 reads ({FORMAT_VERSION}); "
                      "re-export the bundle with this version of m4")
    for name, rec in m["files"].items():
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size != rec["bytes"]:
            what = "missing" if size is None else f"{size} bytes, the manifest says {rec['bytes']}"
            raise M4Error(f"bundle file {path / name} is {what}: the bundle is incomplete or truncated")
    return m


def manifest_arch(m: dict) -> Arch:
    return Arch.from_hf(m["architecture"])
