#!/usr/bin/env bash
# The demo recipe (scripts/train_demo.sh) on a lent GPU machine, inside one device call:
#     scripts/device_wheels.sh      # here, once
#     run(command="BUDGET=420 INIT=m4/assets/demo VARIANTS='a:32:5e-4 b:64:1e-3' bash scripts/device_train_demo.sh",
#         carry=[".whl"], timeout_s=600)
# Two variants of the recipe train side by side on the one GPU (a model this small leaves it
# mostly idle), each on half the cores: VARIANTS lists NAME:BATCH:LR (LR: the question
# stages' learning rate). Their steps fit BUDGET seconds of training: a 40-step trial of
# both measures the seconds per question-stage step (nothing else may use the GPU then: on
# 2026-11-26 a test run beside it tripled the step and the budget bought a third of its
# steps), and the scene / question / weighted / focused / views / per-view / per-frame stages
# get 15% / 10% / 25% / 20% / 10% / 10% / 10% of the steps that buys (fewer scene steps leave
# the model blind: docs/training.md), or, with INIT (a checkpoint that already reads its
# images, such as the shipped m4/assets/demo), the per-frame stage gets them all. Each variant
# is scored on the held-out bench (seed 5) by train_demo.sh, and on a validation bench
# (seed 2) here, which picks the model to ship: the held-out score stays unbiased. Into
# $OUT, every 15 s and at the end: each variant's weights (NAME.safetensors), run.tgz (the
# small files: logs, configs, tokenizers, scores), train.log.
set -u
: "${OUT:?set OUT to a folder for the results}"
source scripts/device_env.sh
export M4="python3 -m m4" PYTHON=python3
runs=/tmp/demo-runs
variants=(${VARIANTS:-a:32:5e-4 b:64:1e-3})
half=$(( $(nproc) / 2 ))
cores=("0-$(( half - 1 ))" "$half-$(( 2 * half - 1 ))")
log=$OUT/train.log
mkdir -p "$runs"
SECONDS=0
{
    INIT= DATA=$runs/data STEPS0=0 STEPS1=0 STEPS2=0 STEPS3=0 STEPS4=0 STEPS5=0 STEPS6=0 scripts/train_demo.sh "$runs/data"
    $M4 data synth "$runs/val" --n 0 --bench 300 --seed 2
    echo "data: ${SECONDS}s"
} >> "$log" 2>&1

newest() {  # NAME: the variant's latest stage
    ls -td "$runs/$1"/per-frame "$runs/$1"/per-view "$runs/$1"/views "$runs/$1"/focused "$runs/$1"/weighted "$runs/$1"/questions "$runs/$1"/scenes 2>/dev/null | head -1
}
copy() {
    for v in "${variants[@]}"; do
        name=${v%%:*}
        last=$(newest "$name")
        [ -n "$last" ] && cp "$last/model.safetensors" "$OUT/$name.safetensors" 2>/dev/null
    done
    tar czf "$OUT/run.tgz" --exclude='*.safetensors' --exclude='checkpoint-*' --exclude=./data \
        --exclude=./val --exclude='cal-*' -C "$runs" . 2>/dev/null
}

# seconds per step of the stage that gets most steps (with INIT: the per-frame stage, and the
# model INIT names, which may see more image tokens than a fresh one), both variants at once
trial=${INIT:+per-frame}
trial=${trial:-focused}
export WORKERS=${WORKERS:-$(( half - 2 ))}
for i in "${!variants[@]}"; do
    IFS=: read -r name batch lr <<< "${variants[$i]}"
    taskset -c "${cores[$i]}" $M4 train --preset demo ${INIT:+--init "$INIT"} --data "$runs/data/$trial.json" \
        --out "$runs/cal-$name" --steps 40 --batch-size "$batch" --save-every 1000 --workers "$WORKERS" >> "$log" 2>&1 &
done
wait
for i in "${!variants[@]}"; do
    IFS=: read -r name batch lr <<< "${variants[$i]}"
    s=$(python3 -c "import json, sys, statistics as st; print(st.median(json.loads(l)['step_s'] for l in list(open(sys.argv[1]))[10:]))" \
        "$runs/cal-$name/log.jsonl")
    read -r steps0 steps1 steps2 steps3 steps4 steps5 steps6 <<< "$(python3 -c "import sys; t = (float(sys.argv[1]) - 30) / float(sys.argv[2]); \
print(*(int(t * f) for f in ((0, 0, 0, 0, 0, 0, 1) if sys.argv[3] else (0.15, 0.10, 0.25, 0.20, 0.10, 0.10, 0.10))))" "${BUDGET:-300}" "$s" "${INIT:-}")"
    echo "variant $name: batch $batch, lr $lr, ${s}s per step -> $steps0 + $steps1 + $steps2 + $steps3 + $steps4 + $steps5 + $steps6 steps" | tee -a "$log"
    ( export BATCH=$batch LR=$lr LR3=$lr LR4=$lr LR5=$lr LR6=$lr DATA=$runs/data \
          STEPS0=$steps0 STEPS1=$steps1 STEPS2=$steps2 STEPS3=$steps3 STEPS4=$steps4 STEPS5=$steps5 STEPS6=$steps6
      taskset -c "${cores[$i]}" scripts/train_demo.sh "$runs/$name" > "$runs/$name.log" 2>&1
      taskset -c "${cores[$i]}" $M4 eval --model "$(newest "$name")" --bench "$runs/val/bench.json" \
          --json "$runs/$name/val.json" >> "$runs/$name.log" 2>&1 ) &
done
( sleep $(( ${BUDGET:-300} + 90 )); echo "budget spent: stopping" >> "$log"; pkill -f "m4 train" ) &
watchdog=$!
while [ -n "$(jobs -pr | grep -v "^$watchdog$")" ]; do sleep 15; copy; done
kill $watchdog 2>/dev/null
copy
for v in "${variants[@]}"; do
    name=${v%%:*}
    python3 -c "
import json, sys
for f in sys.argv[2:]:
    try: d = json.load(open(f))
    except OSError: print(sys.argv[1], f, 'missing'); continue
    print(sys.argv[1], f.split('/')[-1], round(d['overall'], 3), {k: round(v, 3) for k, v in d['by_scenario'].items()})
" "$name" "$runs/$name/eval.json" "$runs/$name/val.json" | tee -a "$log"
done
echo "total: ${SECONDS}s" | tee -a "$log"
