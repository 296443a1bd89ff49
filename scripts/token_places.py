"""Do a frame's image tokens carry their own place? A decoder that picks the asked shape's
token by its colour (one attention head) can name that shape's place only if the token says
where it is: RoPE moves where a head looks, never what it reads. Measured on demo-scene frames
with 2-4 shapes (as scripts/where_frames.py draws them), on the model's image tokens:

- the share of a shape's token's variance (RMS-normalised, as each decoder layer sees it)
  explained by its colour, its kind and its cell;
- a selection probe: a bilinear head (query from the asked colour, softmax over the 9 tokens,
  a linear readout of what it attends to) trained to name the asked shape's place, right on
  held-out frames; and the same with each token's index appended to it, the ceiling when
  tokens carry their place.

--scale K first multiplies the vision tower's position embeddings by K (their norm is ~1
beside an occupied patch's ~22 in the shipped model); --add K instead adds to each a vector of
norm K along one of the 9 directions the patch embedding uses least, so the place is written
where the content is not. --save OUT writes that checkpoint, for `m4 train --init OUT`
(docs/training.md, "The tokens do not say where they are").

    python scripts/token_places.py CKPT [--n 3000] [--scale K | --add K] [--save OUT]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

import m4
from m4.atomic import atomic_directory
from m4.media.demo import COLOURS, KINDS
from m4.media.image import preprocess
from m4.resolve import resolve
from m4.train.synth import CELL, place, render
from where_frames import SIZE, frame


def least_used(embeddings, n: int = 400, seed: int = 99) -> torch.Tensor:
    """(positions, hidden): unit directions of least variance of the patch embedding on n
    demo frames, one per position."""
    conv = embeddings.patch_embedding
    pixels = torch.from_numpy(preprocess([render(frame(seed, 0, i, 4), SIZE, SIZE) for i in range(n)], embeddings.image_size))
    with torch.no_grad():
        patches = conv(pixels).flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    _, vectors = torch.linalg.eigh(torch.cov(patches.T))  # eigenvalues ascending
    return vectors[:, :embeddings.num_positions].T


def placed(src: Path, out: Path, scale: float, add: float) -> None:
    """The checkpoint at src with its vision position embeddings times scale, plus add times
    the least-used directions, written to out."""
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(src)
    embeddings = llava.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings.position_embedding.weight.mul_(scale).add_(add * least_used(embeddings))
    with atomic_directory(out) as tmp:
        llava.save_pretrained(tmp)
        for f in Path(src).iterdir():  # tokenizer and template, as the trainer saves them
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy(f, tmp)


def shapes_and_tokens(model, n: int, seed: int):
    """n frames' shapes as (frame, colour, kind, cell) and their tokens, RMS-normalised."""
    asked, images = [], []
    for i in range(n):
        objs = frame(seed, 0, i, 4)
        images.append(Image.fromarray(render(objs, SIZE, SIZE)))
        for o in objs:
            c, r = CELL[place(o.x, o.y, SIZE, SIZE)]
            asked.append((i, list(COLOURS).index(o.colour), KINDS.index(o.kind), 3 * r + c))
    tokens = np.concatenate([np.asarray(model.encode(images[k:k + 100]), np.float32) for k in range(0, n, 100)])
    tokens /= np.sqrt((tokens ** 2).mean(-1, keepdims=True))
    return np.array(asked), tokens


def explained(x: np.ndarray, labels: np.ndarray) -> float:
    """Share of x's variance that the labels' group means explain."""
    mu, total = x.mean(0), ((x - x.mean(0)) ** 2).sum()
    return float(sum(((x[labels == v].mean(0) - mu) ** 2).sum() * (labels == v).sum() for v in set(labels)) / total)


def selection(asked: np.ndarray, tokens: np.ndarray, with_index: bool, steps: int = 1500, seed: int = 0) -> float:
    """Held-out accuracy of the bilinear head that names the asked colour's cell."""
    torch.manual_seed(seed)
    t = torch.from_numpy(tokens)
    if with_index:
        t = torch.cat([t, 3 * torch.eye(9).expand(len(t), 9, 9)], -1)
    frames, colour, cell = (torch.from_numpy(asked[:, j]) for j in (0, 1, 3))
    query, readout = torch.nn.Embedding(len(COLOURS), t.shape[-1]), torch.nn.Linear(t.shape[-1], 9)
    opt = torch.optim.Adam([*query.parameters(), *readout.parameters()], 1e-2)

    def logits(i):
        x = t[frames[i]]
        a = torch.softmax((x @ query(colour[i])[:, :, None]).squeeze(-1) / x.shape[-1] ** 0.5, -1)
        return readout((a[:, :, None] * x).sum(1))

    cut = frames.max() * 3 // 4  # whole frames held out
    fit, held = (frames < cut).nonzero().squeeze(1), (frames >= cut).nonzero().squeeze(1)
    for _ in range(steps):
        i = fit[torch.randint(len(fit), (256,))]
        loss = torch.nn.functional.cross_entropy(logits(i), cell[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((logits(held).argmax(-1) == cell[held]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=3000, help="frames")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0, help="times the vision position embeddings")
    ap.add_argument("--add", type=float, default=0.0, help="norm added along the least-used directions")
    ap.add_argument("--save", type=Path, help="write the changed checkpoint here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model
        if a.scale != 1.0 or a.add or a.save:
            path = a.save or Path(tmp) / "placed"
            placed(resolve(a.model), path, a.scale, a.add)
        model = m4.load(str(path), device="cpu")
        if model.arch.tokens_per_image != 9:
            raise SystemExit(f"{a.model}: {model.arch.tokens_per_image} tokens per image; this probe reads one per cell of 3 x 3")
        asked, tokens = shapes_and_tokens(model, a.n, a.seed)
    x = tokens[asked[:, 0], asked[:, 3]]  # each shape's own cell's token
    shares = {name: explained(x, asked[:, j]) for name, j in (("colour", 1), ("kind", 2), ("cell", 3))}
    print(f"{len(asked)} shapes in {a.n} frames; variance of a shape's token explained by "
          + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    print(f"selection probe (place of the asked colour): {selection(asked, tokens, False):.3f}; "
          f"with each token's index appended: {selection(asked, tokens, True):.3f}")


if __name__ == "__main__":
    main()
