#!/usr/bin/env bash
# Train the demo model (M4-Synth; docs/training.md, "The demo recipe"): a scene stage (one
# image of 1-3 shapes and what is where, the vision tower frozen at its random init: there
# the model learns to read its image tokens), then a question stage on train.json (questions
# and their dense captions) mixed with the scenes, the tower tuned too (at lr / 5: a random
# tower tells colours and places apart, shapes barely), then the held-out bench (another seed).
# Usage: scripts/train_demo.sh RUN_DIR     (README records the command, seed and time)
# Environment: M4 (default "python -m m4"); N training samples, HELDOUT bench samples,
# STEPS0 / STEPS1 scene and question steps, BATCH, LR1 the question stage's learning rate;
# DATA / HELD reuse data already synthesised there (seeds 0 and 1); INIT a checkpoint to
# start from (with STEPS0=0: the question stage alone, from a model that already reads its
# images).
set -euo pipefail
run=${1:?usage: scripts/train_demo.sh RUN_DIR}
m4=${M4:-python -m m4}
steps0=${STEPS0:-3000}
steps1=${STEPS1:-14000}
n=${N:-30000}
heldout=${HELDOUT:-600}
data=${DATA:-$run/data}
held=${HELD:-$run/heldout}
common=(--preset demo --batch-size "${BATCH:-8}" --save-every 2000 --keep 8 --seed 0)
SECONDS=0
[ -f "$data/train.json" ] || $m4 data synth "$data" --n "$n" --bench 0 --seed 0
[ -f "$held/bench.json" ] || $m4 data synth "$held" --n 10 --bench "$heldout" --seed 1
[ -f "$data/mix.json" ] || ${PYTHON:-python} -c "import json, sys; \
json.dump(json.load(open(sys.argv[1])) + json.load(open(sys.argv[2])), open(sys.argv[3], 'w'))" \
    "$data/train.json" "$data/scenes.json" "$data/mix.json"
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
stage scenes "$data/scenes.json" "$steps0" --lr 1e-3
stage questions "$data/mix.json" "$steps1" --lr "${LR1:-5e-4}" --tune projector,decoder,vision
$m4 eval --model "$prev" --bench "$held/bench.json" --json "$run/eval.json"
echo "total: ${SECONDS}s"
