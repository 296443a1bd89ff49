"""Ship a trained demo checkpoint as the model `demo` names: m4/assets/demo, and beside it the
ONNX bundle exported from it, m4/assets/demo-bundle (what an install without torch runs).

usage: python scripts/ship_demo.py CHECKPOINT   ship a checkpoint, then export its bundle
       python scripts/ship_demo.py --bundle     export the bundle again from the shipped checkpoint
       python scripts/ship_demo.py --check      exit 1 unless the shipped bundle is what --bundle writes

The weights are stored in fp16 (half the repository's bytes; every demo weight is well inside
fp16's range) and config.json keeps float32, so transformers and m4 both load them as fp32.
The bundle is exported in fp16 too: its weights are the checkpoint's own values, and its
answers equal the checkpoint's (tests/test_demo_bundle.py holds it to that). The export is
deterministic for one torch version; another may write other bytes with the same answers,
which --check reports as a difference.
What ships is what was measured: evaluate m4/assets/demo itself, after this script.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from m4.atomic import atomic_directory
from m4.bundle_format import MANIFEST, verify
from m4.export.bundle import export_bundle
from m4.model.config import PRESETS, Arch
from m4.resolve import DEMO_BUNDLE, DEMO_DIR

BUNDLE_DTYPE = "fp16"


def ship(src: Path, dest: Path = DEMO_DIR) -> None:
    arch = Arch.from_dir(src)
    if arch.replace(image_token_id=None) != PRESETS["demo"]:
        sys.exit(f"error: {src} is not a checkpoint of the demo preset")
    state = load_file(src / "model.safetensors")
    with atomic_directory(dest) as tmp:
        save_file({k: t.to(torch.float16) for k, t in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        for f in src.iterdir():
            if f.is_file() and f.suffix in (".json", ".jinja", ".txt") and f.name != "trainer_state.json":
                shutil.copy2(f, tmp / f.name)
    readable(dest)
    print(f"shipped {src} -> {dest} ({(dest / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


def readable(d: Path) -> None:
    """Package data is read by every user: not the private modes of a temporary directory."""
    d.chmod(0o755)
    for f in d.iterdir():
        f.chmod(0o644)


def export(out: Path) -> dict:
    """The bundle of the shipped checkpoint, written to `out`."""
    m = export_bundle("demo", out, BUNDLE_DTYPE)
    readable(out)
    return m


def ship_bundle(dest: Path = DEMO_BUNDLE) -> None:
    m = export(dest)
    verify(dest)
    size = sum(r["bytes"] for r in m["files"].values())
    print(f"exported {DEMO_DIR} -> {dest} ({BUNDLE_DTYPE}, {len(m['files'])} files, {size / 1e6:.1f} MB)")


def check(shipped: Path = DEMO_BUNDLE) -> bool:
    """Whether the shipped bundle's files are, byte for byte, what an export now writes."""
    verify(shipped)
    with tempfile.TemporaryDirectory() as d:
        fresh = export(Path(d) / "bundle")["files"]
    have = json.loads((shipped / MANIFEST).read_text())["files"]
    differ = sorted(name for name in have.keys() | fresh.keys() if have.get(name) != fresh.get(name))
    for name in differ:
        print(f"differs: {name}")
    print(f"{shipped}: " + ("in step with its checkpoint" if not differ
                             else "not what an export of the shipped checkpoint writes: run scripts/ship_demo.py --bundle"))
    return not differ


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--check":
        sys.exit(0 if check() else 1)
    if sys.argv[1] != "--bundle":
        ship(Path(sys.argv[1]))
    ship_bundle()
