"""Where does a checkpoint lose what its images show? For M4-Synth scenes (one shape per cell
of a 3x3 grid, named by the caption), a linear probe reads each shape's colour and kind from
the image tokens over its cell, at three points: the patch embedding, the tower's feature
layer (what LLaVA reads) and the projector's output (what the decoder gets). Then the model
captions the same held-out scenes and we count the shapes it names right. The probes high
and the captions wrong: the decoder does not read what its image tokens carry; the probes
at chance: the tower never learned to see it (docs/training.md).

    python scripts/probe.py CHECKPOINT TRAIN_DIR HELD_DIR [--n 1500] [--held 200]

TRAIN_DIR and HELD_DIR are `m4 data synth` outputs (their scenes.json) of different seeds.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

import m4
from m4.media import load_image, preprocess
from m4.train.synth import PLACES, read_description

CELLS = {p: i for i, p in enumerate(p for row in PLACES for p in row)}
def cell_tokens(grid: int, cell: int) -> list[int]:
    """The image tokens (row-major over a grid x grid patch grid) whose patch centres lie in
    the cell."""
    lo = lambda c: (c * grid + 1) // 3  # noqa: E731  first patch whose centre is in third c
    hi = lambda c: ((c + 1) * grid + 1) // 3  # noqa: E731
    r, c = divmod(cell, 3)
    return [y * grid + x for y in range(lo(r), hi(r)) for x in range(lo(c), hi(c))]


@torch.no_grad()
def features(model, root: Path, n: int):
    """Per shape: its mean token at each probe point, and its (colour, kind)."""
    records = json.loads((root / "scenes.json").read_text())[:n]
    size = model.config.vision_config.image_size
    grid = size // model.config.vision_config.patch_size
    pixels = torch.from_numpy(preprocess([load_image(root / r["image"][0]) for r in records], size))
    states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    layer = model.config.vision_feature_layer
    read = states[layer] if isinstance(layer, int) else torch.cat([states[k] for k in layer], dim=-1)
    if model.config.vision_feature_select_strategy == "default":
        read = read[:, 1:]
    points = {"patch embedding": states[0], "feature layer": read, "projector": model.model.multi_modal_projector(read)}
    x = {name: [] for name in points}
    y = []
    for k, r in enumerate(records):
        for colour, kind, place in read_description(r["conversations"][-1]["value"]):
            idx = cell_tokens(grid, CELLS[place])
            for name, t in points.items():
                x[name].append(t[k, idx].mean(0).numpy())
            y.append((colour, kind))
    return {name: np.array(v) for name, v in x.items()}, y


def probe(x_train, y_train, x_held, y_held) -> float:
    """Held-out accuracy of a ridge-regressed one-hot classifier."""
    labels = sorted(set(y_train))
    target = np.eye(len(labels))[[labels.index(v) for v in y_train]]
    a = np.c_[x_train, np.ones(len(x_train))]
    w = np.linalg.solve(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ target)
    guess = (np.c_[x_held, np.ones(len(x_held))] @ w).argmax(1)
    return float(np.mean([labels[g] == v for g, v in zip(guess, y_held)]))


def caption_recall(path: Path, root: Path, n: int) -> float:
    """Share of the held-out scenes' shapes (colour, kind and place) that the model's own
    caption names."""
    model = m4.load(str(path))
    hit = total = 0
    for r in json.loads((root / "scenes.json").read_text())[:n]:
        want = set(read_description(r["conversations"][-1]["value"]))
        said = model.ask(r["conversations"][0]["value"], images=[str(root / r["image"][0])], max_new_tokens=64)
        hit += len(want & set(read_description(said.strip())))
        total += len(want)
    return hit / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("train", type=Path, help="an `m4 data synth` output to fit the probes on")
    ap.add_argument("held", type=Path, help="another seed's, to score them")
    ap.add_argument("--n", type=int, default=1500, help="scenes to fit on")
    ap.add_argument("--held-n", type=int, default=200, help="held-out scenes")
    args = ap.parse_args()
    model = LlavaForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    x_train, y_train = features(model, args.train, args.n)
    x_held, y_held = features(model, args.held, args.held_n)
    print(f"{'probe':16s} {'colour':>7s} {'kind':>7s}")
    for name in x_train:
        accuracy = [probe(x_train[name], [v[j] for v in y_train], x_held[name], [v[j] for v in y_held]) for j in (0, 1)]
        print(f"{name:16s} {accuracy[0]:7.2f} {accuracy[1]:7.2f}")
    chance = [Counter(v[j] for v in y_held).most_common(1)[0][1] / len(y_held) for j in (0, 1)]
    print(f"{'chance':16s} {chance[0]:7.2f} {chance[1]:7.2f}")
    print(f"captions name {caption_recall(args.checkpoint, args.held, args.held_n):.0%} of the held-out shapes "
          "(colour, kind and place)")


if __name__ == "__main__":
    main()
