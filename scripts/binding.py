"""Does a checkpoint bind a shape's name to its place? On held-out scenes of 2-3 shapes (one
per grid cell, as the scene stage draws them, at the model's image size), for each shape the
caption is forced to begin "a <colour> <kind> at" and the model names a place, greedy: right
only if it is that shape's place (the place of a shape of the scene at random: scenes / shapes,
~0.4, printed). Then the model captions the scenes freely and we count the shapes it names
right (colour, kind and place).
A model that captions in reading order can be right on the second and near chance on the
first (docs/training.md, "Reading order needs no place").

    python scripts/binding.py CHECKPOINT [--n 60] [--seed 777]
"""

import argparse
import re

import numpy as np

import m4
from m4.media import load_image
from m4.prompt import IMAGE
from m4.runtime.context import Context
from m4.train.synth import a_or_an, grid_objects, place, read_description, render

QUESTION = f"{IMAGE}\nDescribe the image."


def scenes(n: int, seed: int, size: int):
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        yield grid_objects(rng, int(rng.integers(2, 4)), size)


def continuation(model, p, images, prefix: list[int], max_new_tokens: int) -> str:
    """What the model writes after the prompt `p` (its images already encoded) and `prefix`."""
    ctx = Context(model.backend, len(p.ids) + len(prefix) + max_new_tokens)
    logits = ctx.append("prompt", model.embed_parts(p.parts + ([prefix] if prefix else []), images))
    return model.tokenizer.decode(ctx.generate(logits, max_new_tokens, model.stop_ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=60, help="scenes")
    ap.add_argument("--seed", type=int, default=777)
    a = ap.parse_args()
    model = m4.load(a.model)
    size = model.arch.vision.image_size
    forced = free = total = 0
    for objs in scenes(a.n, a.seed, size):
        image = render(objs, size, size)
        p, images = model.prompt(QUESTION, images=[image]), model.encode([load_image(image)])
        truth = {(o.colour, o.kind, place(o.x, o.y, size, size)) for o in objs}
        for colour, kind, where in truth:  # the caption forced to begin with this shape
            said = continuation(model, p, images, model.tokenizer.encode(a_or_an(f"{colour} {kind}") + " at"), 4)
            forced += re.split(r",| and|\.", said)[0].strip() == where
        free += sum(t in truth for t in set(read_description(continuation(model, p, images, [], 48))))
        total += len(objs)
    print(f"{a.model}: {total} shapes in {a.n} scenes")
    print(f"  place after 'a <its colour> <its kind> at'  {forced / total:.3f} (a shape at random: {a.n / total:.3f})")
    print(f"  shapes its own caption names right          {free / total:.3f}")


if __name__ == "__main__":
    main()
