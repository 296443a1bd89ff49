"""Peak resident memory and wall time of `m4 export` (and `m4 calibrate --decoder int4`) for
checkpoints of the seeds' real shapes, and the bundles' sizes on disk.

Each command runs in its own process under `/usr/bin/time -v` (its "Maximum resident set
size" is the peak); checkpoints are random weights at a preset's shapes, written tensor by
tensor (`m4 checkpoint random PRESET DIR --dtype fp16`) where DIR does not exist yet.

usage: python benchmarks/export_memory.py --presets 0.5b 7b --dtypes fp16 int4 \
           --work /work/bench-export --json benchmarks/results/export-memory.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from m4.machine import machine


def peak_rss(stderr: str) -> int | None:
    """The peak resident bytes `/usr/bin/time -v` reported."""
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(peak.group(1)) * 1024 if peak else None


def timed(cmd: list[str]) -> dict:
    """Run cmd under /usr/bin/time -v: its exit status, wall seconds and peak RSS in bytes."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    return {"command": " ".join(cmd), "exit": r.returncode, "wall_s": round(wall, 1), "peak_rss_bytes": peak_rss(r.stderr),
            "error": r.stderr.strip().splitlines()[0] if r.returncode else None}


def sizes(bundle: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(bundle.iterdir()) if f.is_file()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["0.5b"])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "int4"])
    p.add_argument("--work", type=Path, default=Path("bench-export"))
    p.add_argument("--keep", nargs="*", default=[], help="dtypes whose bundles are kept (others are removed after measuring)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    m4 = [sys.executable, "-m", "m4"]
    rows = []
    for preset in a.presets:
        ckpt = a.work / "checkpoints" / preset
        if not ckpt.exists():
            subprocess.run([*m4, "checkpoint", "random", preset, str(ckpt), "--dtype", "fp16"], check=True)
        for dtype in a.dtypes:
            out = a.work / "bundles" / f"{preset}-{dtype}"
            r = {"preset": preset, "step": f"export --dtype {dtype}",
                 **timed([*m4, "export", str(ckpt), str(out), "--dtype", dtype])}
            if r["exit"] == 0:
                r["bundle_bytes"] = sizes(out)
            rows.append(r)
            Console(stderr=True).print(r)
            if dtype not in a.keep:
                shutil.rmtree(out, ignore_errors=True)
    t = Table("preset", "step", "peak RSS GB", "wall s", "bundle GB", title=f"m4 export on {machine()['cpu']}")
    for r in rows:
        total = sum(r.get("bundle_bytes", {}).values())
        t.add_row(r["preset"], r["step"], f"{(r['peak_rss_bytes'] or 0) / 1e9:.2f}", f"{r['wall_s']:.0f}",
                  f"{total / 1e9:.2f}" if total else (r["error"] or "-"))
    Console().print(t)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
