#!/usr/bin/env bash
# Study 5, lane A: the supervised teacher (study 4's settings), then MGD-RD on three seeds. Resumable: finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
COMMON=(--output-dir output/s5 --images 8192 --epochs 2 --knn-freq 2 --mgd-schedule authors --mgd-samples 2048 -j 1
        --mgd-loss-factor 100 --no-random-init)
$PY experiments/fashion_mnist.py "${COMMON[@]}" --teacher-kind supervised --teacher-epochs 6 --methods mgd-rd --seeds 0 1 2
$PY experiments/fashion_mnist.py "${COMMON[@]}" --methods mgd-amp-nomatch --seeds 2
