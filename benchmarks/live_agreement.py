"""Greedy-token agreement of approximate eviction (shifted cache, re-rotated keys) with
exact eviction (refill from cached embeddings), on tiny random checkpoints.

    python benchmarks/live_agreement.py [--seeds 8] [--frames 16] [--windows 4 8]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import m4
from m4.model.checkpoint import random_checkpoint

QUESTION = "What is happening?"


def agreement(model, window: int, frames: int, new_tokens: int, rng) -> tuple[list[bool], list[float]]:
    exact, approx = model.stream(window=window), model.stream(window=window, exact=False)
    same, prefix = [], []
    for _ in range(frames):
        f = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        exact.add_frame(f)
        approx.add_frame(f)
        if exact.stats["frames_seen"] <= window:
            continue  # no eviction yet: the two modes hold the same cache
        a = list(exact.tokens(QUESTION, max_new_tokens=new_tokens))
        b = list(approx.tokens(QUESTION, max_new_tokens=new_tokens))
        same.append(a == b)
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k / max(len(a), 1))
    return same, prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for window in args.windows:
            same, prefix = [], []
            for seed in range(args.seeds):
                path = Path(tmp) / f"tiny-{seed}"
                if not path.exists():
                    random_checkpoint("tiny", path, seed=seed, std=0.2)
                s, p = agreement(m4.load(path), window, args.frames, args.new_tokens, np.random.default_rng(seed))
                same += s
                prefix += p
            print(f"window {window}: {len(same)} questions after evictions, {args.seeds} tiny checkpoints: "
                  f"whole answer equal {np.mean(same) * 100:.1f}%, "
                  f"tokens before the first difference {np.mean(prefix) * 100:.1f}% of {args.new_tokens}")


if __name__ == "__main__":
    main()
