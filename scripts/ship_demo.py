"""Ship a trained demo checkpoint as the model `demo` names: m4/assets/demo.

usage: python scripts/ship_demo.py CHECKPOINT

The weights are stored in fp16 (half the repository's bytes; every demo weight is well inside
fp16's range) and config.json keeps float32, so transformers and m4 both load them as fp32.
What ships is what was measured: evaluate m4/assets/demo itself, after this script.
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from m4.atomic import atomic_directory
from m4.model.config import PRESETS, Arch
from m4.resolve import DEMO_DIR


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
    print(f"shipped {src} -> {dest} ({(dest / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ship(Path(sys.argv[1]))
