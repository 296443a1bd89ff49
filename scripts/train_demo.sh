#!/usr/bin/env bash
# Train the demo model on M4-Synth (docs/demo-model.md, "Recipe"), in eight stages:
#   scenes     one image of 1-3 shapes and what is where, the vision tower frozen at its random
#              init: there the model learns to read its image tokens;
#   questions  train.json (questions and their dense captions) mixed with the scenes, the tower
#              tuned too (at lr / 5: a random tower tells colours and places apart, shapes barely);
#   weighted   the questions of two synth seeds, the tasks the mix learns last weighted up
#              (scripts/mix_tasks.py), a fifth of the records captions;
#   focused    the same questions reweighted towards count and view-count, fewer captions;
#   views      the questions of a third seed too, view-count and motion weighted up, the
#              tasks learned early down;
#   per-view   the same with questions about one view at a time added ("How many red objects
#              does view 2 show?"): the step that view-count, the most any view shows, builds
#              on; count back up, which the new "How many" questions otherwise make it forget;
#   per-frame  the same with questions about one frame of a motion clip added ("Where is the
#              cyan circle in frame 1?");
#   lone       the per-frame mix with motion clips of one shape added
#              (scripts/lone_motion.py): the scene `m4 run --video demo` plays;
# then the held-out bench (another seed). Ship the result with scripts/ship_demo.py.
# Usage: scripts/train_demo.sh RUN_DIR
# Environment: M4 (default "python -m m4"); N / N2 / N3 training samples of seeds 0 / 4 / 6, NL one-shape clips,
# HELDOUT bench samples (seed 5), DATA the folder for them (default RUN_DIR; shared by several
# runs), STEPS0 ... STEPS7 the stages' steps (all 0: only the data), BATCH, LR the question
# stages' learning rate (the focused, views, per-view, per-frame and lone stages: LR3 ... LR7), WORKERS
# the data-loader processes (default 1); INIT a checkpoint to start from (with STEPS0=0 ...
# STEPS6=0: the lone stage alone, e.g. from m4/assets/demo to train the shipped model further).
set -euo pipefail
run=${1:?usage: scripts/train_demo.sh RUN_DIR}
m4=${M4:-python -m m4}
py=${PYTHON:-python}
here=$(dirname "$0")
steps0=${STEPS0:-3000}
steps1=${STEPS1:-2000}
steps2=${STEPS2:-20000}
steps3=${STEPS3:-30000}
steps4=${STEPS4:-20000}
steps5=${STEPS5:-20000}
steps6=${STEPS6:-14000}
steps7=${STEPS7:-6000}
data=${DATA:-$run}
lr=${LR:-5e-4}
# one data-loader process beside the two torch threads: 18% faster steps on 2 cores (docs/performance.md)
common=(--preset demo --batch-size "${BATCH:-8}" --save-every 2000 --keep 10 --log-every 50 --workers "${WORKERS:-1}")
SECONDS=0
[ -f "$data/A/train.json" ] || $m4 data synth "$data/A" --n "${N:-30000}" --bench 0 --seed 0
[ -f "$data/B/train.json" ] || $m4 data synth "$data/B" --n "${N2:-60000}" --bench 0 --seed 4
[ -f "$data/C/train.json" ] || $m4 data synth "$data/C" --n "${N3:-30000}" --bench 0 --seed 6
[ -f "$data/lone/train.json" ] || $py "$here/lone_motion.py" "$data/lone" --n "${NL:-4000}" --bench 200 --seed 21
[ -f "$data/held/bench.json" ] || $m4 data synth "$data/held" --n 10 --bench "${HELDOUT:-600}" --seed 5
[ -f "$data/A/mix.json" ] || $py -c "import json, sys; \
json.dump(json.load(open(sys.argv[1])) + json.load(open(sys.argv[2])), open(sys.argv[3], 'w'))" \
    "$data/A/train.json" "$data/A/scenes.json" "$data/A/mix.json"
[ -f "$data/weighted.json" ] || $py "$here/mix_tasks.py" "$data/weighted.json" "$data/A/train.json" "$data/B/train.json" \
    --captions 0.2 --seed 1 --weight patch-colour=0.6 --weight order=0.6 --weight diff-describe=0.8 \
    --weight diff-move=1.2 --weight count=1.3 --weight diff-colour=1.3 --weight patch-shape=1.3 --weight view-count=1.3
[ -f "$data/focused.json" ] || $py "$here/mix_tasks.py" "$data/focused.json" "$data/A/train.json" "$data/B/train.json" \
    --captions 0.15 --seed 2 --weight count=3 --weight view-count=2.5 --weight diff-move=2 --weight diff-colour=2 \
    --weight patch-shape=2 --weight motion=1.5 --weight order=0.6 --weight diff-describe=0.6 --weight patch-colour=0.5
[ -f "$data/views.json" ] || $py "$here/mix_tasks.py" "$data/views.json" "$data/A/train.json" "$data/B/train.json" \
    "$data/C/train.json" --captions 0.15 --seed 4 --weight view-count=4 --weight motion=2.5 --weight view-total=1.2 \
    --weight diff-colour=1.3 --weight diff-move=1.3 --weight order=0.5 --weight diff-describe=0.5 --weight count=0.4 \
    --weight patch-shape=0.3 --weight patch-colour=0.25
# the per-view and per-frame mixes: the same weights and single-view questions
late=("$data/A/train.json" "$data/B/train.json" "$data/C/train.json" --captions 0.15 --weight view-count=3
      --weight motion=2.5 --weight view-total=1.2 --weight count=1.5 --weight diff-colour=1.3 --weight diff-move=1.3
      --weight order=0.5 --weight diff-describe=0.5 --weight patch-shape=0.3 --weight patch-colour=0.25 --per-view 2)
[ -f "$data/per-view.json" ] || $py "$here/mix_tasks.py" "$data/per-view.json" "${late[@]}" --seed 6
[ -f "$data/per-frame.json" ] || $py "$here/mix_tasks.py" "$data/per-frame.json" "${late[@]}" --seed 7 --per-frame 3
[ -f "$data/lone.json" ] || $py "$here/mix_tasks.py" "$data/lone.json" "${late[@]:0:3}" "$data/lone/train.json" \
    "${late[@]:3}" --seed 10 --per-frame 3
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
stage scenes "$data/A/scenes.json" "$steps0" --lr 1e-3 --seed 0
stage questions "$data/A/mix.json" "$steps1" --lr "$lr" --tune projector,decoder,vision --seed 0
stage weighted "$data/weighted.json" "$steps2" --lr "$lr" --tune projector,decoder,vision --seed 1
stage focused "$data/focused.json" "$steps3" --lr "${LR3:-4e-4}" --tune projector,decoder,vision --seed 3
stage views "$data/views.json" "$steps4" --lr "${LR4:-3e-4}" --tune projector,decoder,vision --seed 4
stage per-view "$data/per-view.json" "$steps5" --lr "${LR5:-3e-4}" --tune projector,decoder,vision --seed 6
stage per-frame "$data/per-frame.json" "$steps6" --lr "${LR6:-2e-4}" --tune projector,decoder,vision --seed 7
stage lone "$data/lone.json" "$steps7" --lr "${LR7:-2e-4}" --tune projector,decoder,vision --seed 10
[ -z "$prev" ] || $m4 eval --model "$prev" --bench "$data/held/bench.json" --json "$run/eval.json"
echo "total: ${SECONDS}s"
