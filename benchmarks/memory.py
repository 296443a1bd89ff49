"""The memory each preset needs at fp16 / int8 / int4 (README's Jetson table), computed from
the presets' shapes by m4.info.memory_needs; no weights are loaded.

    python benchmarks/memory.py [--frames 8] [--text-tokens 512]
"""

import argparse

from m4.info import memory_needs
from m4.model.config import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=512)
    args = ap.parse_args()
    print(f"| preset | parameters | KV cache ({args.frames} frames + {args.text_tokens} tokens, fp16) "
          "| fp16 total | int8 total | int4 total |")
    print("|---|---|---|---|---|---|")
    for name in ("0.5b", "7b", "14b"):
        arch = PRESETS[name]
        m = memory_needs(arch, args.frames, args.text_tokens)
        gib = {k: f"{v['total'] / 2**30:.2f} GiB" for k, v in m.items()}
        print(f"| {name} | {sum(arch.params().values()) / 1e9:.2f} B | {m['fp16']['kv_cache'] / 2**30:.2f} GiB "
              f"| {gib['fp16']} | {gib['int8']} | {gib['int4']} |")


if __name__ == "__main__":
    main()
