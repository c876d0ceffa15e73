#!/usr/bin/env bash
# Study 5, the loss factor below study 4's best: MGD-AMP at factor 30 on three seeds, students of lane A's teacher.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
/work/main/.venv/bin/python experiments/fashion_mnist.py --output-dir output/s5_lf30 --teacher-from output/s5 --images 8192 \
    --epochs 2 --knn-freq 2 --mgd-schedule authors --mgd-samples 2048 -j 1 --mgd-loss-factor 30 --no-random-init \
    --methods mgd-amp --seeds 0 1 2
