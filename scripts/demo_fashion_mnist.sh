#!/usr/bin/env bash
# The README's main job at demo size (a few minutes on 2 CPU cores): pretrain a small MoCo-v2
# ResNet-50 teacher on Fashion-MNIST, then distil a ResNet-18 student from it with MGD.
#   bash scripts/demo_fashion_mnist.sh [OUTPUT_DIR]        (default output/demo)
# Environment: PYTHON (default .venv/bin/python), EPOCHS (2), IMAGES (4096), IMAGE_SIZE (32).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/demo}
PYTHON=${PYTHON:-.venv/bin/python}
EPOCHS=${EPOCHS:-2}
IMAGES=${IMAGES:-4096}
IMAGE_SIZE=${IMAGE_SIZE:-32}
FMNIST=/usr/share/datasets/fashion-mnist

if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST is not in $FMNIST: installing Debian's package dataset-fashion-mnist (30 MB)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -q dataset-fashion-mnist || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
fi

# -b 64 over one process; the queue (4096) is a multiple of it. Same seed for both runs.
# kNN top-1 on the 10k test images at the end of each run (and of the teacher, as the student's reference).
COMMON=(--dataset fashion-mnist --image-size "$IMAGE_SIZE" --epochs "$EPOCHS" -b 64 --moco-k 4096 --mlp
        --aug-plus --cos -j 2 --max-images "$IMAGES" --seed 0 -p 20 --knn-freq "$EPOCHS" --knn-k 20 --knn-t 0.07)
LAST=$(printf 'checkpoint_%04d.pth.tar' $((EPOCHS - 1)))

echo "== 1/2 teacher: MoCo-v2 ResNet-50 -> $OUT/teacher"
"$PYTHON" main_moco_mgd.py -a resnet50 "${COMMON[@]}" --output-dir "$OUT/teacher"

echo "== 2/2 student: MoCo-v2 + MGD (amp) ResNet-18 <- ResNet-50 -> $OUT/mgd"
"$PYTHON" main_moco_mgd.py -a resnet18 "${COMMON[@]}" --teacher-arch resnet50 \
    --teacher-checkpoint "$OUT/teacher/$LAST" --mgd-schedule every:1 --mgd-samples 2048 --output-dir "$OUT/mgd"

echo "== done: student checkpoint $OUT/mgd/$LAST, logs in $OUT/*/log.txt and $OUT/*/metrics.jsonl"
for run in teacher mgd; do grep "kNN (" "$OUT/$run/log.txt" | sed "s/^.*\] /$run run: /"; done
