#!/usr/bin/env bash
# The long MoCo-v2 ResNet-50 teacher of RESULTS (K 512, zero-init residuals, lr 0.03, 24 epochs), in a 2-process gloo group
# (official shuffle BN, 32 images per process): on this machine 2 one-thread processes train ~80 img/s, 24 epochs in ~45 min.
# Resumable: the same command continues from the newest checkpoint of its output directory.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
/work/main/.venv/bin/python main_moco_mgd.py /usr/share/datasets/fashion-mnist --dataset fashion-mnist --image-size 32 \
    -a resnet50 --epochs 24 -b 64 --lr 0.03 --moco-m 0.99 --moco-t 0.2 --mlp --aug-plus --cos --max-images 8192 \
    --seed 0 -j 1 -p 16 --knn-freq 4 --knn-k 20 --knn-t 0.07 --moco-k 512 --zero-init-residual --keep-checkpoints 2 \
    --multiprocessing-distributed --nproc-per-node 2 --world-size 1 --rank 0 --dist-url tcp://127.0.0.1:23457 \
    --output-dir output/teacher_r50_24ep_2proc
