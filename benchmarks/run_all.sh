#!/usr/bin/env bash
# Reproduce docs/performance.md's CPU tables on this machine. Run it on a quiet machine:
# on 2 cores another busy process halves every figure.
#   bash benchmarks/run_all.sh            (from the repository root, after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"

# Stage by stage, m4's backends beside transformers, the demo preset with random weights.
$PY -m m4 bench --preset demo --random-weights --backends torch,onnx,hf --workload all \
    --json "$OUT/bench-demo.json" --plot "$OUT/bench-demo.png"
$PY benchmarks/table.py "$OUT/bench-demo.json" | tee "$OUT/table-demo.md"

# The live context's time to first token against transformers on an 8-frame window.
$PY benchmarks/stream.py --model demo --window 8 --repeats 10 --json "$OUT/stream-demo.json" | tee "$OUT/stream-demo.txt"
