"""Single frames of demo scenes, every shape asked where it is ("Where is the cyan circle?",
answered with a place of the 3 x 3 grid): a motion answer needs that step for one shape among
several, and the shipped model does not take it (docs/training.md, "One answer for every
shape of a clip"). Writes OUT/train.json and OUT/bench.json (LLaVA-Interleave Bench format,
task `where`), one question a record, frames as motion clips have them (384 px; the model
resizes them). Not a frame's shapes asked in turns: the shapes fill distinct cells, so a later
turn's answer is one of the cells not yet named, and with two shapes the second answer needs no
look at its colour at all (docs/training.md, "Where the place goes").

    python scripts/where_frames.py OUT [--n 12000] [--bench 200] [--seed 31] [--shapes K]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from rich.progress import track

from m4.atomic import atomic_directory
from m4.prompt import IMAGE
from m4.train.synth import FRAMES, Obj, clip_scene, conversation, place, render, save_images, scene_objects

SIZE = 384  # a motion clip's frames, before the model's resize


def frame(seed: int, split: int, i: int, shapes: int) -> list[Obj]:
    """The shapes (at most `shapes`) of one frame, drawn at random, of a demo scene."""
    rng = np.random.default_rng([seed, split, i])
    return scene_objects(clip_scene(rng, SIZE))[int(rng.integers(FRAMES))][:shapes]


def asked(objs: list[Obj]) -> list[tuple[str, str]]:
    return [(f"Where is the {o.name}?", place(o.x, o.y, SIZE, SIZE)) for o in objs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=12000, help="training frames")
    ap.add_argument("--bench", type=int, default=200, help="bench frames (every shape asked)")
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--shapes", type=int, default=4, help="at most this many shapes a frame")
    a = ap.parse_args()
    train, bench = [], []
    with atomic_directory(a.out) as root:
        (root / "media").mkdir()
        for i in track(range(a.n + a.bench), description="frames"):
            split, k = (0, i) if i < a.n else (1, i - a.n)
            objs = frame(a.seed, split, k, a.shapes)
            stem = f"where-{'bench-' * split}{k:06d}"
            image = save_images(root, stem, [render(objs, SIZE, SIZE)])
            records = [{"image": image, "conversations": conversation(f"{IMAGE}\n{q}", ans)} for q, ans in asked(objs)]
            if split == 0:
                train += [{"id": f"{stem}-{j}", **r} for j, r in enumerate(records)]
            else:
                meta = {"question_type": "open-ended", "dataset": "where", "scenario": "single-image"}
                bench += [{"sample_id": f"{stem}-{j}", **r, "metadata": meta} for j, r in enumerate(records)]
        for name, rows in (("train", train), ("bench", bench)):
            (root / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(f"{a.out}: {len(train)} training questions on {a.n} frames, {len(bench)} bench questions")


if __name__ == "__main__":
    main()
