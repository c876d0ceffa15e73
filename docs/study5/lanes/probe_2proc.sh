#!/usr/bin/env bash
# The untried collapse remedy of issue 14: the ResNet-50 MoCo-v2 teacher setting of the "K 512, zero-init" probe, in a
# real 2-process gloo group (the official shuffle BN across processes, 32 images per process) instead of one process
# with split BN. Resumable: the same command continues from the newest checkpoint of its output directory.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
/work/main/.venv/bin/python main_moco_mgd.py /usr/share/datasets/fashion-mnist --dataset fashion-mnist --image-size 32 \
    -a resnet50 --epochs 2 -b 64 --lr 0.0075 --moco-m 0.99 --moco-t 0.2 --mlp --aug-plus --cos --max-images 8192 \
    --seed 0 -j 1 -p 16 --knn-freq 2 --knn-k 20 --knn-t 0.07 --moco-k 512 --zero-init-residual \
    --multiprocessing-distributed --nproc-per-node 2 --world-size 1 --rank 0 --dist-url tcp://127.0.0.1:23456 \
    --output-dir output/probes/k512_zeroinit_2proc
