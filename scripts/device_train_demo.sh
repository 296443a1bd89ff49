#!/usr/bin/env bash
# The demo recipe (scripts/train_demo.sh) on a lent GPU machine, in one device call:
#     scripts/device_wheels.sh      # here, once
#     run(command="BUDGET=480 bash scripts/device_train_demo.sh", carry=[".whl"], timeout_s=600)
# The run stops at BUDGET seconds, whatever stage it is in; the newest weights, the logs and
# the held-out scores are copied into $OUT every 15 s, so a stopped run still returns them.
# STEPS0/STEPS1/STEPS2, N and HELDOUT pass through to train_demo.sh.
set -u
: "${OUT:?set OUT to a folder for the results}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 M4="python3 -m m4"
run=/tmp/demo-run
scripts/train_demo.sh "$run" > "$OUT/train.log" 2>&1 &
job=$!
( sleep "${BUDGET:-480}"; echo "budget spent: stopping" >> "$OUT/train.log"; pkill -f "m4 train" ) &
watchdog=$!
copy() {
    newest=$(ls -td "$run"/demo "$run"/captions "$run"/scenes 2>/dev/null | head -1)
    [ -n "$newest" ] && cp "$newest"/model.safetensors "$OUT/model.safetensors" 2>/dev/null
    tar czf "$OUT/run.tgz" --exclude=model.safetensors --exclude='checkpoint-*' --exclude=./data --exclude=./heldout \
        -C "$run" . 2>/dev/null
}
while kill -0 $job 2>/dev/null; do sleep 15; copy; done
kill $watchdog 2>/dev/null
copy
python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print({k: d[k] for k in ('overall', 'by_scenario', 'chance')})" \
    "$run/eval.json" 2>/dev/null || echo "no eval.json: the run stopped before the bench"
