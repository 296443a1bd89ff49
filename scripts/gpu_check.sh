#!/usr/bin/env bash
# The one device call that verifies and times the GPU fast path on a lent CUDA machine
# (issue #8, and #7's CUDA bench), from the repository root (4 minutes on an H200, 2026-11-26):
#
#     OUT=DIR scripts/gpu_check.sh
#
# Steps, each under its own time limit, each writing its log (and results) into $OUT as it
# goes, so a step that runs out leaves the earlier steps' results:
#   env            nvidia-smi, torch, CUDA and transformers versions
#   test_gpu       tests/test_gpu.py: fp32 tokens = transformers, fp16 agreement, graphs, int8,
#                  torch.compile
#   gpu_bench      benchmarks/gpu.py -> gpu-0.5b.json (m4 fp16 / int8 vs transformers, roofline)
#   m4_bench_cuda  m4 bench --preset 0.5b --random-weights --backends torch,hf --device cuda
# ONLY="NAME ..." runs those steps alone. The machine has no network: wheels in .whl/
# (transformers, av: scripts/device_wheels.sh) are installed first (scripts/device_env.sh).
set -u
: "${OUT:?set OUT to a folder for the results}"
PY=${PYTHON:-python3}
source scripts/device_env.sh
export M4_CACHE=${M4_CACHE:-/tmp/m4-cache}

BUDGET=${BUDGET:-540}  # seconds for the whole check: a step gets its limit or what is left
step() {  # NAME LIMIT_S COMMAND...: run it, log to $OUT/NAME.log, print its exit status and tail
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    if (( BUDGET - SECONDS < limit )); then limit=$(( BUDGET - SECONDS )); fi
    if (( limit < 10 )); then echo "== $name: skipped, no time left"; return; fi
    echo "== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0))s"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

TAIL=8 step env 30 bash -c "nvidia-smi; $PY -c \"import torch, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__)\""
step test_gpu 150 $PY -m pytest -q -s -rs tests/test_gpu.py
TAIL=40 step gpu_bench 300 $PY benchmarks/gpu.py --json "$OUT/gpu-0.5b.json"
step m4_bench_cuda 150 $PY -m m4 bench --preset 0.5b --random-weights --backends torch,hf --device cuda \
    --json "$OUT/bench-cuda-0.5b.json" --plot "$OUT/bench-cuda-0.5b.png"
