#!/usr/bin/env bash
# Study 5, after lane B: the baselines of seeds 1 and 2.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
COMMON=(--output-dir output/s5 --images 8192 --epochs 2 --knn-freq 2 --mgd-schedule authors --mgd-samples 2048 -j 1
        --mgd-loss-factor 100 --no-random-init)
$PY experiments/fashion_mnist.py "${COMMON[@]}" --methods baseline --seeds 1 2
