#!/usr/bin/env bash
# Study 5, after lane A: MGD-AMP on three seeds. This machine's floating point differs from study 4's (seed 0's baseline:
# the same first loss, neg_sim apart in the 8th digit, 74.27 / 71.63 against 74.55 / 72.73), so every row is rerun here.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
COMMON=(--output-dir output/s5 --images 8192 --epochs 2 --knn-freq 2 --mgd-schedule authors --mgd-samples 2048 -j 1
        --mgd-loss-factor 100 --no-random-init)
$PY experiments/fashion_mnist.py "${COMMON[@]}" --methods mgd-amp --seeds 0 1 2
