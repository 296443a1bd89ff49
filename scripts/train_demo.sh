#!/usr/bin/env bash
# Train the demo model that m4 ships (m4/assets/demo): M4-Synth, a scene stage (one image,
# 1-3 shapes: from scratch the model learns to look here, and stays blind on the harder
# captions; docs/training.md), a caption stage over all four scenarios, a question stage,
# then the held-out bench (another seed).
# Usage: scripts/train_demo.sh RUN_DIR     (README records the command, seed and time)
# Environment: M4 (default "python -m m4"); N training samples, HELDOUT bench samples,
# STEPS0 / STEPS1 / STEPS2 scene, caption and question steps, BATCH, LR2 the question stage's
# learning rate (defaults: the shipped model's); DATA / HELD reuse data already synthesised
# there (seeds 0 and 1).
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
[ -f "$held/bench.json" ] || $m4 data synth "$held" --n 0 --bench "$heldout" --seed 1
echo "data: ${SECONDS}s"
$m4 train "${common[@]}" --data "$data/scenes.json" --out "$run/scenes" --steps "$steps0" \
    --lr 1e-3 --vision-lr 1e-3
echo "scene stage: ${SECONDS}s"
$m4 train "${common[@]}" --init "$run/scenes" --data "$data/captions.json" --out "$run/captions" \
    --steps "$steps1" --lr 1e-3 --vision-lr 1e-3
echo "caption stage: ${SECONDS}s"
$m4 train "${common[@]}" --init "$run/captions" --data "$data/train.json" --out "$run/demo" \
    --steps "$steps2" --lr "${LR2:-5e-4}"
echo "question stage: ${SECONDS}s"
$m4 eval --model "$run/demo" --bench "$held/bench.json" --json "$run/eval.json"
echo "total: ${SECONDS}s"
