"""The bundle format: what `m4 export` writes and the runtime, `m4 calibrate`, `m4 build` and
`m4 info` read. `m4.json` (the manifest) names every file with its size and sha256.

Plain JSON and the standard library only: the ONNX and TensorRT runtimes read bundles on
machines without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from m4.errors import M4Error
from m4.model.config import Arch

MANIFEST = "m4.json"
# 2: the graphs read their weights from shared files (VISION_WEIGHTS, DECODER_WEIGHTS) and
# decoder graphs take a batch (past_len (B,))
FORMAT_VERSION = 2
# ONNX element types of the graphs' floating inputs, by the manifest's dtype names
DTYPES = {"fp32": "float32", "fp16": "float16"}

# The graphs' weights, as ONNX external data: vision.onnx's, and one file that decoder.onnx and
# decoder_ort.onnx both read (the decoder's weights are stored once)
VISION_WEIGHTS = "vision.weights"
DECODER_WEIGHTS = "decoder.weights"

# decoder.onnx's twin for ONNX Runtime on the CPU (m4/export/ort_graph.py), when the manifest
# lists it: weight-only quantised bundles carry it quantised alike, w8a8 bundles none
ORT_DECODER = "decoder_ort.onnx"

# The bundle runtimes prefill in pieces of at most this many tokens (it bounds the attention
# scores one decoder call materialises); `m4 build` sizes the engines' prefill profile to it
# and `m4 calibrate` its calibration prompts.
PREFILL_CHUNK = 512


def past_names(layers: int) -> list[str]:
    """The decoder graphs' cache inputs, in order: each layer's key, then its value."""
    return [f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """decoder_ort.onnx's cache outputs: the same buffers as its inputs, written in place."""
    return [f"present_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]


def is_bundle(path: Path) -> bool:
    """A directory with m4.json, or with ONNX files but no manifest (a broken bundle)."""
    return (path / MANIFEST).is_file() or any(path.glob("*.onnx"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def load_manifest(path: Path) -> dict:
    """m4.json parsed, its format version checked; its files not looked at."""
    f = path / MANIFEST
    if not f.is_file():
        raise M4Error(f"{path} has ONNX files but no {MANIFEST}: not a complete bundle (re-run m4 export)")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise M4Error(f"cannot read {f}: {e}") from None
    version = m.get("format_version") if isinstance(m, dict) else None
    if version != FORMAT_VERSION:
        source = m.get("source") if isinstance(m, dict) and isinstance(m.get("source"), str) else "CHECKPOINT"
        raise M4Error(f"{path} is a bundle of format {version!r} and this m4 reads format {FORMAT_VERSION}: "
                      f"export it again with `m4 export {source} {path}`")
    return m


def size_problem(path: Path, name: str, rec: dict) -> str | None:
    size = (path / name).stat().st_size if (path / name).is_file() else None
    if size == rec["bytes"]:
        return None
    return "missing" if size is None else f"{size} bytes, the manifest says {rec['bytes']}"


def read_manifest(path: Path) -> dict:
    """m4.json, checked: known version, and every file it lists present at its size (a cheap
    check that catches truncated copies; `verify` compares the contents)."""
    m = load_manifest(path)
    for name, rec in m["files"].items():
        what = size_problem(path, name, rec)
        if what:
            raise M4Error(f"bundle file {path / name} is {what}: the bundle is incomplete or truncated")
    return m


def check_files(path: Path, m: dict) -> dict[str, str | None]:
    """Each file the manifest lists: None where its size and sha256 match, else what is wrong."""
    out = {}
    for name, rec in m["files"].items():
        what = size_problem(path, name, rec)
        if what is None and sha256(path / name) != rec["sha256"]:
            what = "its contents changed (sha256 differs)"
        out[name] = what
    return out


def verifying() -> bool:
    """Whether loading checks a bundle's hashes: M4_VERIFY=0 in the environment skips it."""
    return os.environ.get("M4_VERIFY", "1") != "0"


def verify(path: Path) -> dict:
    """The manifest, once every file it lists matches its sha256: a bundle whose files changed
    after it was written (a flipped byte, a file from another export) would otherwise load and
    answer, wrongly."""
    m = read_manifest(path)
    bad = {name: what for name, what in check_files(path, m).items() if what}
    if bad:
        name, what = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more file{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
        raise M4Error(f"bundle file {path / name} does not match {MANIFEST}: {what}{more}; re-export or re-copy "
                      f"the bundle (m4 verify {path} checks every file; M4_VERIFY=0 skips this check)")
    return m


def manifest_arch(m: dict) -> Arch:
    return Arch.from_hf(m["architecture"])
