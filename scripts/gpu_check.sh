#!/usr/bin/env bash
# Verify and time the CUDA fast path on any machine with an NVIDIA GPU and m4 installed
# (`make setup` or `pip install -e '.[dev]'` with a CUDA build of torch). From the
# repository root:
#
#     scripts/gpu_check.sh                 # results in gpu-check/ (in the repository)
#     OUT=DIR scripts/gpu_check.sh         # results in DIR
#
# Steps, each under its own time limit, each writing its log (and results) into $OUT as it
# goes, so a step that runs out leaves the earlier steps' results:
#   env            nvidia-smi, torch, CUDA and transformers versions
#   test_gpu       tests/test_gpu.py: fp32 tokens = transformers, fp16 agreement, CUDA graphs,
#                  int8, torch.compile
#   test_trt       tests/test_trt.py where TensorRT's Python API imports: engines built with
#                  m4 build answer as transformers does (the TensorRT backend's first GPU run)
#   gpu_bench      benchmarks/gpu.py -> gpu-0.5b.json (m4 fp16 / int8 vs transformers, roofline)
#   m4_bench_cuda  m4 bench --preset 0.5b --random-weights --backends torch,hf --device cuda
#                  -> bench-cuda-0.5b.json and .png
#   streams_cuda   benchmarks/streams.py, torch fp16 on CUDA, 1 to 16 contexts answering at once
#                  -> streams-cuda-0.5b.json
# ONLY="NAME ..." runs those steps alone; BUDGET (default 540) caps the seconds of the whole
# check; PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
set -u
mkdir -p "${OUT:=$(dirname "$0")/../gpu-check}"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
export PYTHONUNBUFFERED=1

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
step test_trt 200 bash -c "if $PY -c 'import tensorrt' 2>/dev/null; then exec $PY -m pytest -q -s -rs tests/test_trt.py; \
else echo 'TensorRT is not installed here: nothing run (pip install tensorrt)'; fi"
TAIL=40 step gpu_bench 300 $PY benchmarks/gpu.py --json "$OUT/gpu-0.5b.json"
step m4_bench_cuda 150 $PY -m m4 bench --preset 0.5b --random-weights --backends torch,hf --device cuda \
    --json "$OUT/bench-cuda-0.5b.json" --plot "$OUT/bench-cuda-0.5b.png"
TAIL=20 step streams_cuda 200 $PY benchmarks/streams.py --backends torch --device cuda --streams 1 2 4 8 16 \
    --json "$OUT/streams-cuda-0.5b.json"
echo "results in $OUT/"
