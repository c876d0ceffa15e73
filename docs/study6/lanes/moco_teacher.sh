#!/usr/bin/env bash
# Study 6, part 6: the MoCo-v2 ResNet-50 teacher, trained once with study 5's recipe ("The long teacher in two
# processes": K 512, zero-init residuals, lr 0.03, 24 epochs on 8,192 training images, two one-thread gloo
# processes with shuffle BN; 49 min on the idle 2-core machine). Its checkpoint stays outside git; its sha256
# is written beside it and copied into docs/study6/moco_teacher.sha256 by hand when it is final.
# Resumable: the same command continues from the newest checkpoint.
#   bash docs/study6/lanes/moco_teacher.sh ROOT        (from the repository root; writes ROOT/moco_teacher)
set -euo pipefail
OUT=${1:?output directory}/moco_teacher
PY=${PYTHON:-.venv/bin/python}
if [ ! -f "$OUT/checkpoint_0023.pth.tar" ]; then
  OMP_NUM_THREADS=1 $PY main_moco_mgd.py /usr/share/datasets/fashion-mnist --dataset fashion-mnist --image-size 32 \
      -a resnet50 --epochs 24 -b 64 --lr 0.03 --moco-m 0.99 --moco-t 0.2 --mlp --aug-plus --cos --max-images 8192 \
      --seed 0 -j 1 -p 16 --knn-freq 4 --knn-k 20 --knn-t 0.07 --moco-k 512 --zero-init-residual --keep-checkpoints 2 \
      --multiprocessing-distributed --nproc-per-node 2 --world-size 1 --rank 0 --dist-url tcp://127.0.0.1:23461 \
      --output-dir "$OUT"
fi
sha256sum "$OUT/checkpoint_0023.pth.tar" | tee "$OUT/sha256.txt"
