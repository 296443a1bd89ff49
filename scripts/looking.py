"""Does a checkpoint look at its images? For each record of an M4-Instruct JSON (captions or
questions), the mean loss of its answer tokens with its own images and with the images of the
next record of the same task and shape. A model that ignores its images scores both alike
(gap 0); one that reads them pays for another record's pixels. Loss falls long before a small
model starts to look (DESIGN, "The demo model"): this tells the two apart in a minute, before
any accuracy does.

    python scripts/looking.py CHECKPOINT DATA.json [--n 200]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from m4.model.config import Arch
from m4.prompt import detect_template
from m4.tokenizer import Tokenizer
from m4.train.data import Collate, InstructData


def task(record_id: str) -> str:
    """M4-Synth ids: TASK-NNNNNN or TASK-NNNNNN-caption."""
    return record_id.removesuffix("-caption").rsplit("-", 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--n", type=int, default=200, help="records to score")
    args = ap.parse_args()
    model = LlavaForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    arch, tokenizer = Arch.from_dir(args.checkpoint), Tokenizer.from_dir(args.checkpoint)
    records = json.loads(args.data.read_text())[:args.n]
    data = InstructData(records, args.data.parent, tokenizer, detect_template(tokenizer), arch.image_token_id,
                        arch.vision.image_size, tokens_per_image=arch.tokens_per_image)
    collate = Collate(arch.image_token_id, arch.tokens_per_image, 0)
    examples = [data[(i, 0)] for i in range(len(records))]
    tasks = [task(r["id"]) for r in records]

    def loss(x, pixels) -> float:
        b = collate([x])
        with torch.no_grad():
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                         pixel_values=torch.from_numpy(pixels)).loss.item()

    sums = defaultdict(lambda: [0.0, 0.0, 0])
    def pixels(x):  # None for a skipped record or one without images
        return getattr(x, "pixels", None)

    for i, x in enumerate(examples):
        if pixels(x) is None:
            continue
        other = next((y for t, y in zip(tasks[i + 1:], examples[i + 1:])
                      if t == tasks[i] and pixels(y) is not None and y.pixels.shape == x.pixels.shape), None)
        if other is None:
            continue
        s = sums[tasks[i]]
        s[0], s[1], s[2] = s[0] + loss(x, x.pixels), s[1] + loss(x, other.pixels), s[2] + 1
    print(f"{'task':16s} {'n':>4s} {'own':>7s} {'other':>7s} {'gap':>7s}")
    for name, (own, other, n) in sorted(sums.items()):
        print(f"{name:16s} {n:4d} {own / n:7.3f} {other / n:7.3f} {(other - own) / n:+7.3f}")


if __name__ == "__main__":
    main()
