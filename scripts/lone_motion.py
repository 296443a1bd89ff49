"""Motion clips of one shape: demo scenes with only their first shape drawn, asked which way it
moves ("Which way does the cyan circle move?"). `m4 run --video demo` plays such a scene. The
demo model tells which way a lone shape moves once it has seen a few hundred of them, but not
which way the asked one of several moves (docs/demo-model.md, "Known limits").
Writes OUT/train.json (each clip's question and its "Describe each frame." caption, as
`m4 data synth` writes them; task `lone-motion`) and OUT/bench.json (LLaVA-Interleave Bench
format, task `lone-motion`, scored by `m4 eval`).

    python scripts/lone_motion.py OUT [--n 4000] [--bench 200] [--seed 21]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from rich.progress import track

from m4.atomic import atomic_directory
from m4.model.config import PRESETS
from m4.train.synth import bench_record, motion, train_records

TASK = "lone-motion"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=4000, help="training clips")
    ap.add_argument("--bench", type=int, default=200, help="bench clips")
    ap.add_argument("--seed", type=int, default=21)
    a = ap.parse_args()
    size = PRESETS["demo"].vision.image_size
    train, bench = [], []
    with atomic_directory(a.out) as root:
        (root / "media").mkdir()
        for i in track(range(a.n + a.bench), description="clips"):
            split, k = (0, i) if i < a.n else (1, i - a.n)
            item = motion(np.random.default_rng([a.seed, split, k]), size, shapes=1)
            item.task = TASK
            if split == 0:
                train += train_records(root, k, item)
            else:
                bench.append(bench_record(root, k, item, like="motion"))
        for name, rows in (("train", train), ("bench", bench)):
            (root / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(f"{a.out}: {a.n} training clips ({len(train)} records), {len(bench)} bench clips")


if __name__ == "__main__":
    main()
