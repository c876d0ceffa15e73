#!/usr/bin/env bash
# Study 5, lane B: seed 0's baseline (checks that this commit reproduces study 4 bit for bit), then, once lane A's teacher
# is there, MGD-SM on three seeds and MGD-AMP without matching on seeds 0 and 1.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
COMMON=(--output-dir output/s5 --images 8192 --epochs 2 --knn-freq 2 --mgd-schedule authors --mgd-samples 2048 -j 1
        --mgd-loss-factor 100 --no-random-init)
$PY experiments/fashion_mnist.py "${COMMON[@]}" --methods baseline --seeds 0
until [ -f output/s5/teacher/result.json ]; do sleep 20; done
$PY experiments/fashion_mnist.py "${COMMON[@]}" --methods mgd-sm --seeds 0 1 2
$PY experiments/fashion_mnist.py "${COMMON[@]}" --methods mgd-amp-nomatch --seeds 0 1
