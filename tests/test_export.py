"""What `m4 export` writes beyond the graphs' parity (test_onnx.py): each weight once, and
nothing left behind by a killed export."""

import os
import subprocess
import sys

import onnx

from m4.bundle_format import DECODER_WEIGHTS, ORT_DECODER, VISION_WEIGHTS
from m4.calib.decoder import external, place
from m4.export.bundle import export_bundle


def places(f) -> dict[str, tuple[str, str]]:
    """Each external initializer of a graph -> (its file, its offset)."""
    g = onnx.load(str(f), load_external_data=False).graph
    return {t.name: (p["location"], p["offset"]) for t in g.initializer if external(t) for p in (place(t),)}


def test_the_decoder_weights_are_stored_once(bundles):
    """decoder.onnx and decoder_ort.onnx read their weights from one file: every linear's
    weight and every norm weight is one place in it, read by both graphs, and the graph
    files themselves hold no weights of size."""
    b = bundles["gqa-untied-penult-full"]
    plain, fused = places(b / "decoder.onnx"), places(b / ORT_DECODER)
    assert {f for f, _ in {**plain, **fused}.values()} == {DECODER_WEIGHTS}
    shared = set(plain.values()) & set(fused.values())
    layers = 2  # the tiny preset: qkv, o, gate_up, down, two norms a layer; final norm, lm_head
    assert len(shared) >= 6 * layers + 2
    stored = (b / DECODER_WEIGHTS).stat().st_size
    linears = sum(t.dims[0] * t.dims[1] * 4 for t in onnx.load(str(b / ORT_DECODER), load_external_data=False)
                  .graph.initializer if len(t.dims) == 2 and t.name.endswith(".T"))
    rope = 2 * 32768 * 16 * 4  # decoder.onnx's own cos and sin tables
    assert stored < linears + rope + 64 * 4096  # once, plus norms, biases and page alignment
    assert set(places(b / "vision.onnx").values()) and all(f == VISION_WEIGHTS for f, _ in places(b / "vision.onnx").values())


def test_a_killed_export_leaves_nothing_the_next_one_keeps(checkpoints, tmp_path):
    """An export killed mid-way leaves its temporary directory beside OUT (the kernel gives it
    no chance to clean); the next export of the same OUT removes it, and keeps others'."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "bundle"
    stale = tmp_path / f".bundle.abc123.{dead.pid}.tmp"
    stale.mkdir()
    (stale / "decoder.weights").write_bytes(b"\0" * 1024)
    busy = tmp_path / f".bundle.def456.{os.getpid()}.tmp"  # a live writer's (this process)
    busy.mkdir()
    other = tmp_path / f".other.abc.{dead.pid}.tmp"  # another OUT's
    other.mkdir()
    export_bundle(str(checkpoints["gqa-tied-last-full"]), out)
    assert not stale.exists() and busy.exists() and other.exists()
    assert (out / "m4.json").is_file()
