"""Memory of long live streams: N live contexts of one model (the demo model by default), each
a sliding window of 8 frames fed its own demo scene, a question every 50 frames asked of all
of them together (one Batch over their answers, stepped to the end). Resident memory after
frame 2,000 should match that after frame 100, and be the model's weights and N fixed caches
over what the process held before loading it.

    python benchmarks/stream_memory.py [--model demo] [--backend auto] [--contexts 1] [--frames 2000]
                                       [--window 8] [--every 50] [--json out.json]

Expected memory counts every parameter at the backend's dtype, and a cache as layers x 2
(keys, values) x kv_heads x head_dim x positions x dtype bytes, its positions those of a live
context (live.stats['cache_size']), times the caches allocated: torch one per context; ONNX
Runtime pools caches in pages of 8 contexts' (a page allocated whole), each cache rounded up
to a multiple of 256 positions plus a spare one. Not counted: the libraries, ONNX Runtime's
arenas, activations.
"""

import argparse
import gc
import json

import m4
from m4.bench import rss_bytes
from m4.machine import machine
from m4.media import DemoScene
from m4.runtime.answer import Batch

QUESTION = "What is moving?"


def caches(lives: list) -> tuple[int, int]:
    """(positions of a cache, caches allocated) for these live contexts of one size, as their
    backend allocates them: torch a cache each; ONNX Runtime pages of SLOTS caches, each
    rounded up to a multiple of CACHE_BUCKET positions plus a spare one."""
    size = lives[0].stats["cache_size"]
    if getattr(lives[0].ctx.cache, "page", None) is None:
        return size, len(lives)
    from m4.runtime.backend import CACHE_BUCKET
    from m4.runtime.onnx_backend import SLOTS

    size = min(-(-size // CACHE_BUCKET) * CACHE_BUCKET, lives[0].arch.text.max_positions - 1) + 1
    return size, -(-len(lives) // SLOTS) * SLOTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--contexts", type=int, default=1, help="live contexts of the model, one demo scene each")
    ap.add_argument("--frames", type=int, default=2000, help="frames fed to each context")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()

    for lib in ("torch", "onnxruntime"):  # their code in the baseline, not in the model's share
        try:
            __import__(lib)
        except ImportError:
            pass
    gc.collect()
    base = rss_bytes()
    model = m4.load(args.model, backend=args.backend)
    gc.collect()
    loaded = rss_bytes()
    lives = [model.stream(window=args.window, max_new_tokens=8) for _ in range(args.contexts)]
    scenes = [DemoScene(seed=i, fps=10, duration=args.frames / 10) for i in range(args.contexts)]

    t, dtype_bytes = model.arch.text, model.backend.dtype.itemsize
    weights = sum(model.arch.params().values()) * dtype_bytes
    positions, allocated = caches(lives)
    cache = t.layers * 2 * t.kv_heads * t.head_dim * positions * dtype_bytes
    expected = weights + allocated * cache
    print(f"{model.backend.name}, {args.contexts} contexts of {args.window} frames: expected {expected / 2**20:.1f} MiB "
          f"over the {base / 2**20:.1f} MiB before loading = weights {weights / 2**20:.1f} MiB + {allocated} caches "
          f"allocated x {cache / 2**20:.2f} MiB ({positions} positions, {dtype_bytes}-byte values); the model "
          f"loaded: +{(loaded - base) / 2**20:.1f} MiB")

    first = min(100, args.frames // 2)
    marks = {}
    for i in range(args.frames):
        for live, scene in zip(lives, scenes):
            live.add_frame(scene.frame(i))
        if (i + 1) % args.every == 0:
            batch = Batch()
            for live in lives:
                batch.join(live.start(QUESTION, max_new_tokens=8))
            while len(batch):
                batch.step()
        if i + 1 in (first, 500, 1000, args.frames) or (i + 1) % 500 == 0:
            gc.collect()
            marks[i + 1] = rss_bytes()
            print(f"frame {i + 1:5d}  rss {marks[i + 1] / 2**20:8.1f} MiB  (+{(marks[i + 1] - base) / 2**20:.1f} MiB)"
                  f"  cache tokens {lives[0].stats['cache_tokens']}  ingest {lives[0].stats['ingest_ms']:.1f} ms",
                  flush=True)
    growth = marks[args.frames] / marks[first] - 1
    last = marks[args.frames]
    print(f"{machine()['cpu']}: rss after frame {args.frames} vs frame {first}: {growth * 100:+.2f}%; "
          f"{(last - base) / 2**20:.1f} MiB over the baseline (expected {expected / 2**20:.1f}), "
          f"{(last - loaded) / 2**20:.1f} MiB over the loaded model (expected {allocated * cache / 2**20:.1f})")
    if args.json:
        record = {"machine": machine(), "model": args.model, "backend": model.backend.name,
                  "contexts": args.contexts, "window": args.window, "frames": args.frames, "every": args.every,
                  "baseline_bytes": base, "loaded_bytes": loaded, "weights_bytes": weights, "cache_positions": positions,
                  "cache_bytes": cache, "caches_allocated": allocated, "expected_bytes": expected, "rss_bytes": marks, "growth": growth}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
