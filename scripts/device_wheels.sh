#!/usr/bin/env bash
# Wheels that a lent GPU machine lacks, fetched here into .whl/ (ignored by git) for the
# device tool to carry: its image has Python 3.12, torch and an older transformers, no PyAV.
# scripts/gpu_check.sh and the training drivers install them into /tmp/site first.
#     scripts/device_wheels.sh            then: run(..., carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "transformers==5.24.0" "av==18.1.0"
du -sh .whl
