"""Give a checkpoint's vision tower finer patches, keeping what it has learned.

usage: python scripts/refine_patches.py CHECKPOINT OUT [--patch P]

The demo model sees a 96-px image as 3 x 3 patches of 32 px, where one patch often holds parts
of several of a motion clip's small shapes (docs/training.md, "Where motion is lost"). With P = 16
it sees 6 x 6.
The new patch kernel is the old one summed over f x f blocks (f = old / new patch size), so a
new patch embeds exactly as an old patch of the image upscaled f times (nearest) would: the
tower sees each image as a zoomed-in copy. The position embeddings are interpolated (bicubic)
from the old grid to the new one, as SigLIP does for other resolutions. The decoder then gets
f² times the image tokens and has to be trained on them (scripts/device_train_demo.sh).
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from m4.atomic import atomic_directory
from m4.train.trainer import TOKENIZER_FILES


def refine(state: dict[str, torch.Tensor], patch: int, new_patch: int, image_size: int) -> dict[str, torch.Tensor]:
    if patch % new_patch or image_size % new_patch:
        raise SystemExit(f"error: patch {new_patch} must divide the old patch {patch} and the image size {image_size}")
    f, grid = patch // new_patch, image_size // patch
    key = next(k for k in state if k.endswith("embeddings.patch_embedding.weight"))
    prefix = key[:-len("patch_embedding.weight")]
    w = state[key].float()
    dim = w.shape[0]
    kernel = w.reshape(dim, 3, new_patch, f, new_patch, f).sum((3, 5))
    pos = state[prefix + "position_embedding.weight"].float().T.reshape(1, dim, grid, grid)
    pos = F.interpolate(pos, size=(grid * f, grid * f), mode="bicubic", align_corners=False)
    dtype = state[key].dtype
    return {**state, key: kernel.to(dtype),
            prefix + "position_embedding.weight": pos.reshape(dim, -1).T.contiguous().to(dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--patch", type=int, default=16)
    args = ap.parse_args()
    config = json.loads((args.checkpoint / "config.json").read_text())
    vision = config["vision_config"]
    state = refine(load_file(args.checkpoint / "model.safetensors"), vision["patch_size"], args.patch,
                   vision["image_size"])
    vision["patch_size"] = args.patch
    config["image_seq_length"] = (vision["image_size"] // args.patch) ** 2
    with atomic_directory(args.out) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (args.checkpoint / name).is_file():
                shutil.copy2(args.checkpoint / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{args.checkpoint} -> {args.out}: {config['image_seq_length']} image tokens per image")


if __name__ == "__main__":
    main()
