"""Bundles of the seeds' real sizes answering on this CPU: `m4 run --model BUNDLE --images x.png
--prompt ... --json` in its own process under `/usr/bin/time -v`, its decode rate beside the
roofline of the weight bytes one token reads at this machine's measured memory bandwidth, and
its peak resident memory beside the bundle's weights plus the KV cache.

usage: python benchmarks/big_models.py /work/bundles/7b-int4 [...] --new-tokens 8 \
           --json benchmarks/results/big-models.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from m4.bundle_format import DECODER_WEIGHTS, manifest_arch, read_manifest
from m4.machine import machine

from export_memory import peak_rss

GB = 1e9


def bandwidth(size: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second read by a sum over an array larger than the caches (best of repeats)."""
    a = np.ones(size // 8, np.float64)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return size / best


def answer(bundle: Path, image: Path, prompt: str, new_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "m4", "run", "--model", str(bundle), "--images", str(image), "--prompt", prompt,
           "--max-new-tokens", str(new_tokens), "--json"]
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    done = [e for e in events if e.get("event") == "answer"]
    return {"command": " ".join(cmd), "exit": r.returncode, "peak_rss_bytes": peak_rss(r.stderr),
            "answer": done[-1] if done else None, "error": None if done else r.stderr.strip().splitlines()[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--prompt", default="What is in this picture?")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    bw = bandwidth()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "x.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), np.uint8)).save(image)
        for b in a.bundles:
            m = read_manifest(b)
            arch = manifest_arch(m)
            decode_bytes = (b / DECODER_WEIGHTS).stat().st_size  # every linear read once a token (norms: noise)
            weights = sum(f["bytes"] for name, f in m["files"].items() if name.endswith((".weights", ".npy")))
            r = {"bundle": str(b), "source": m["source"], "quantisation": sorted({q["scheme"] for q in
                                                                                 (m["quantisation"] or {}).values()}),
                 "decode_bytes": decode_bytes, "weights_bytes": weights,
                 "kv_bytes_per_token": 2 * arch.text.layers * arch.text.kv_heads * arch.text.head_dim * 4,
                 **answer(b, image, a.prompt, a.new_tokens)}
            r["roofline_tok_s"] = bw / decode_bytes
            rows.append(r)
            Console(stderr=True).print(r)
    t = Table("bundle", "decode tok/s", "roofline tok/s", "of roofline", "ttft s", "peak RSS GB", "weights GB",
              title=f"{machine()['cpu']}, {machine()['cores']} cores, read bandwidth {bw / GB:.1f} GB/s")
    for r in rows:
        ans = r["answer"] or {}
        rate = ans.get("decode_tok_s")
        t.add_row(Path(r["bundle"]).name, f"{rate:.2f}" if rate else "-", f"{r['roofline_tok_s']:.2f}",
                  f"{rate / r['roofline_tok_s']:.0%}" if rate else "-", f"{ans.get('ttft_ms', 0) / 1e3:.1f}",
                  f"{(r['peak_rss_bytes'] or 0) / GB:.2f}", f"{r['weights_bytes'] / GB:.2f}")
    Console().print(t)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": machine(), "read_bandwidth_bytes_s": bw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
