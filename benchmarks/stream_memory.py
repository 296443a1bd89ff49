"""Memory of a long live stream: the demo model, a sliding window of 8 frames, a question
every 50 frames. Resident memory after frame 2,000 should match that after frame 100.

    python benchmarks/stream_memory.py [--frames 2000] [--window 8] [--every 50]
"""

import argparse
import gc

import m4
from m4.bench import rss_bytes
from m4.machine import machine
from m4.media import DemoScene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()

    model = m4.load(args.model)
    live = model.stream(window=args.window, max_new_tokens=8)
    scene = DemoScene(seed=0, fps=10, duration=args.frames / 10)
    marks = {}
    for i in range(args.frames):
        live.add_frame(scene.frame(i))
        if (i + 1) % args.every == 0:
            live.ask("What is moving?", max_new_tokens=8)
        if i + 1 in (100, 500, 1000, args.frames) or (i + 1) % 500 == 0:
            gc.collect()
            marks[i + 1] = rss_bytes()
            print(f"frame {i + 1:5d}  rss {marks[i + 1] / 2**20:8.1f} MiB  cache tokens {live.stats['cache_tokens']}"
                  f"  ingest {live.stats['ingest_ms']:.1f} ms", flush=True)
    growth = marks[args.frames] / marks[100] - 1
    print(f"{machine()['cpu']}: rss after frame {args.frames} vs frame 100: {growth * 100:+.2f}%")


if __name__ == "__main__":
    main()
