"""The memory each preset needs at fp16 / int8 / int4 (docs/deploy.md's memory table), and decode's
bandwidth bound on Jetson Orin boards (weight bytes read per token ÷ the spec sheet's memory
bandwidth), computed from the presets' shapes by m4.info.memory_needs; no weights are loaded.

    python benchmarks/memory.py [--frames 8] [--text-tokens 512]
"""

import argparse

from m4.info import memory_needs
from m4.model.config import PRESETS

BANDWIDTH = {"AGX Orin": 204.8e9, "Orin NX 16GB": 102.4e9}  # bytes/s, NVIDIA's spec sheets
PRESET_NAMES = ("0.5b", "7b", "14b")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=512)
    args = ap.parse_args()
    print(f"| preset | parameters | KV cache ({args.frames} frames + {args.text_tokens} tokens, fp16) "
          "| fp16 total | int8 total | int4 total |")
    print("|---|---|---|---|---|---|")
    needs = {name: memory_needs(PRESETS[name], args.frames, args.text_tokens) for name in PRESET_NAMES}
    for name, m in needs.items():
        gib = {k: f"{v['total'] / 2**30:.2f} GiB" for k, v in m.items()}
        print(f"| {name} | {sum(PRESETS[name].params().values()) / 1e9:.2f} B | {m['fp16']['kv_cache'] / 2**30:.2f} GiB "
              f"| {gib['fp16']} | {gib['int8']} | {gib['int4']} |")
    print()
    print("| preset | decode reads per token fp16 / int8 / int4 | " + " | ".join(
        f"{board} ({bw / 1e9:.0f} GB/s) bound, tok/s fp16 / int8 / int4" for board, bw in BANDWIDTH.items()) + " |")
    print("|---|---|" + "---|" * len(BANDWIDTH))
    for name, m in needs.items():
        read = [m[k]["decode_bytes"] for k in ("fp16", "int8", "int4")]
        bounds = [" / ".join(f"{bw / b:.0f}" for b in read) for bw in BANDWIDTH.values()]
        print(f"| {name} | " + " / ".join(f"{b / 1e9:.2f} GB" for b in read) + " | " + " | ".join(bounds) + " |")


if __name__ == "__main__":
    main()
