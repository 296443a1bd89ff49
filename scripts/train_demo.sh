#!/usr/bin/env bash
# Train the demo model that m4 ships (m4/assets/demo): M4-Synth, a scene stage (one image,
# 1-3 shapes: from scratch the model learns to look here, and stays blind on the harder
# captions; docs/training.md), a caption stage over all four scenarios, a question stage,
# then the held-out bench (another seed).
# Usage: scripts/train_demo.sh RUN_DIR     (README records the command, seed and time)
# Environment: M4 (default "python -m m4"); N training samples, HELDOUT bench samples,
# STEPS0 / STEPS1 / STEPS2 scene, caption and question steps, BATCH, LR2 the question stage's
# learning rate (defaults: the shipped model's); DATA / HELD reuse data already synthesised
# there (seeds 0 and 1; HELD with 200 training samples, whose scenes scripts/probe.py
# scores); INIT a checkpoint to start from (with STEPS0=0 STEPS1=0: the question stage
# alone, from a model that already reads its images); PYTHON for scripts/probe.py.
set -euo pipefail
run=${1:?usage: scripts/train_demo.sh RUN_DIR}
m4=${M4:-python -m m4}
steps0=${STEPS0:-1500}
steps1=${STEPS1:-3000}
steps2=${STEPS2:-8000}
n=${N:-40000}
heldout=${HELDOUT:-600}
data=${DATA:-$run/data}
held=${HELD:-$run/heldout}
common=(--preset demo --batch-size "${BATCH:-32}" --tune projector,decoder,vision --save-every 500 --seed 0)
SECONDS=0
[ -f "$data/train.json" ] || $m4 data synth "$data" --n "$n" --bench 0 --seed 0
[ -f "$held/bench.json" ] || $m4 data synth "$held" --n 200 --bench "$heldout" --seed 1
echo "data: ${SECONDS}s"
prev=${INIT:-}
stage() {  # NAME DATA STEPS TRAIN-OPTIONS...: a stage of 0 steps is skipped
    local name=$1 json=$2 steps=$3
    shift 3
    if (( steps > 0 )); then
        $m4 train "${common[@]}" ${prev:+--init "$prev"} --data "$json" --out "$run/$name" --steps "$steps" "$@"
        prev=$run/$name
    fi
    echo "$name stage: ${SECONDS}s"
}
stage scenes "$data/scenes.json" "$steps0" --lr 1e-3 --vision-lr 1e-3
# what the image tokens carry and what the captions name, on held-out scenes (a model that
# names the places but not the colours has not learned to read its tokens yet)
if [ -n "$prev" ]; then
    ${PYTHON:-python} "$(dirname "$0")/probe.py" "$prev" "$data" "$held" --held-n 100 || echo "probe.py failed"
fi
stage captions "$data/captions.json" "$steps1" --lr 1e-3 --vision-lr 1e-3
stage questions "$data/train.json" "$steps2" --lr "${LR2:-5e-4}"
$m4 eval --model "$prev" --bench "$held/bench.json" --json "$run/eval.json"
echo "total: ${SECONDS}s"
