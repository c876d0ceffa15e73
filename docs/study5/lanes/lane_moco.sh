#!/usr/bin/env bash
# Study 5, the MoCo-v2 teacher: the 24-epoch 2-process ResNet-50 evaluated as the teacher row, and MGD-AMP students of it
# (study 5's setting, factor 1e2) against the baselines of output/s5. Lane 1: the teacher row, seeds 0 and 2; lane 2: seed 1.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
CKPT=output/teacher_r50_24ep_2proc/checkpoint_0023.pth.tar
C=(--output-dir output/s5_moco --teacher-checkpoint $CKPT --images 8192 --epochs 2 --knn-freq 2 --mgd-schedule authors
   --mgd-samples 2048 -j 1 --mgd-loss-factor 100 --no-random-init --methods mgd-amp)
for s in 0 1 2; do mkdir -p output/s5_moco/seed$s; [ -e output/s5_moco/seed$s/baseline ] || cp -al output/s5/seed$s/baseline output/s5_moco/seed$s/; done
if [ "${1:-1}" = 1 ]; then
    /work/main/.venv/bin/python experiments/fashion_mnist.py "${C[@]}" --seeds 0 2
else
    until [ -f output/s5_moco/teacher/result.json ]; do sleep 10; done
    /work/main/.venv/bin/python experiments/fashion_mnist.py "${C[@]}" --seeds 1
fi
