"""M4-Synth's scene captions with each caption's shapes in random order. `describe` names a
scene's shapes in reading order, and a decoder can write that caption by where it looks (the
next occupied cell, by RoPE) without any token saying where it is; in random order, "a red
square at" has to be finished with the place of the red square's token, the step a motion
answer needs for one shape among several (docs/training.md, "Reading order needs no place").

    python scripts/shuffle_captions.py SRC/scenes.json OUT.json [--seed 0]

OUT.json's image paths are rewritten relative to OUT's folder, as mix_tasks.py does.
"""

import argparse

import numpy as np

from m4.jsonio import write_json_list
from m4.train.synth import a_or_an, joined, read_description
from mix_tasks import records_for


def shuffled(caption: str, rng: np.random.Generator) -> str:
    shapes = read_description(caption)
    shapes = [shapes[i] for i in rng.permutation(len(shapes))]
    return joined([f"{a_or_an(f'{colour} {kind}')} at {where}" for colour, kind, where in shapes]) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    records = records_for(a.src, a.out, "a list of scene records")
    for r in records:
        answer = r["conversations"][1]
        answer["value"] = shuffled(answer["value"], rng)
    write_json_list(a.out, records)
    print(f"{a.out}: {len(records)} scenes, captions in random order")


if __name__ == "__main__":
    main()
