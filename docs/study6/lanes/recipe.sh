#!/usr/bin/env bash
# Study 6, part 1: a scale-model recipe in which MoCo-v2 beats random weights. Baseline ResNet-18
# runs (no teacher) on 2,048 of the 54,000 kept training images, kNN every few epochs and the linear
# probe at the end, all scored on the 6,000 held-out training images (--val-holdout 0.1), never on
# the test set. Random weights of each input shape (image size, stem) are scored the same way.
# Resumable: a finished run is skipped, an unfinished one resumes from its last checkpoint.
#   bash docs/study6/lanes/recipe.sh OUT [NAME ...]     (from the repository root; NAME: the runs below)
set -euo pipefail
OUT=${1:?output directory}; shift
PY=${PYTHON:-.venv/bin/python}
DATA=/usr/share/datasets/fashion-mnist
COMMON=(--dataset fashion-mnist --max-images 2048 --val-holdout 0.1 -j 2)
# name -> "input shape | pretraining flags"; the shape goes to the probes and the random floor too.
declare -A RUNS=(
  [lr0.0075]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 20"
  [lr0.03]="--image-size 32 --stem imagenet | -b 64 --lr 0.03 --moco-k 1024 --epochs 20"
  [lr0.06]="--image-size 32 --stem imagenet | -b 64 --lr 0.06 --moco-k 1024 --epochs 20"
  [lr0.12]="--image-size 32 --stem imagenet | -b 64 --lr 0.12 --moco-k 1024 --epochs 20"
  [b32_lr0.03]="--image-size 32 --stem imagenet | -b 32 --lr 0.03 --moco-k 1024 --epochs 20"
  [t0.1]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 20 --moco-t 0.1"
  [small16]="--image-size 16 --stem small | -b 64 --lr 0.0075 --moco-k 1024 --epochs 10"
  [small16_lr0.03]="--image-size 16 --stem small | -b 64 --lr 0.03 --moco-k 1024 --epochs 10"
  # Zero-initialised residual branches and a short queue: what got the MoCo-v2 ResNet-50 out of its
  # collapse in study 5. The random floor stays torchvision's default initialisation (the stronger one).
  [zi]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 20 --zero-init-residual"
  [zi_lr0.03_k512]="--image-size 32 --stem imagenet | -b 64 --lr 0.03 --moco-k 512 --epochs 20 --zero-init-residual"
  # Larger smallest crops: at 0.2 a crop of a 28 px garment is a patch of texture, not a shape.
  [crop0.5]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 20 --crop-min 0.5"
  [crop0.5_zi]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 20 --crop-min 0.5 --zero-init-residual"
  [small16_crop0.5]="--image-size 16 --stem small | -b 64 --lr 0.0075 --moco-k 1024 --epochs 10 --crop-min 0.5"
  [crop0.8]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 20 --crop-min 0.8"
  [crop1.0]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 20 --crop-min 1.0"
  [crop0.8_40ep]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 40 --crop-min 0.8"
  [crop0.8_lr0.015]="--image-size 32 --stem imagenet | -b 64 --lr 0.015 --moco-k 1024 --epochs 20 --crop-min 0.8"
  [crop0.5_40ep]="--image-size 32 --stem imagenet | -b 64 --lr 0.0075 --moco-k 1024 --epochs 40 --crop-min 0.5"
  [crop0.5_lr0.015]="--image-size 32 --stem imagenet | -b 64 --lr 0.015 --moco-k 1024 --epochs 20 --crop-min 0.5"
)
NAMES=("$@"); [ ${#NAMES[@]} -gt 0 ] || NAMES=(lr0.0075 lr0.03 lr0.06 lr0.12 b32_lr0.03)
finished_probe() { grep -q '"epoch": 99' "$1/metrics.jsonl" 2>/dev/null; }
linear_probe() {  # DIR SHAPE [--pretrained CKPT]: MoCo's linear protocol on cached features, + kNN of them
  local dir=$1 shape=$2; shift 2
  finished_probe "$dir/lincls" && return
  mkdir -p "$dir/lincls"; rm -f "$dir/lincls/checkpoint.pth.tar" "$dir/lincls/metrics.jsonl"
  # shellcheck disable=SC2086
  local cmd=($PY main_lincls.py $DATA "${COMMON[@]}" $shape -a resnet18 --seed 0 "$@" --cached-features --epochs 100
             --schedule 60 80 -p 1000 --knn-k 20 --knn-t 0.07 --output-dir "$dir/lincls")
  echo "\$ ${cmd[*]}" > "$dir/lincls/stdout.txt"
  "${cmd[@]}" >> "$dir/lincls/stdout.txt" 2>&1
}
for name in "${NAMES[@]}"; do
  shape=${RUNS[$name]%%|*}; flags=${RUNS[$name]#*|}
  floor=$OUT/random/$(echo $shape | tr -d ' -')/seed0   # random weights of this input shape
  linear_probe "$floor" "$shape"
  dir=$OUT/$name/seed0
  epochs=$(echo "$flags" | sed -E 's/.*--epochs ([0-9]+).*/\1/')
  last=$(printf "%s/checkpoint_%04d.pth.tar" "$dir" $((epochs - 1)))
  mkdir -p "$dir"
  if [ ! -f "$last" ]; then
    # shellcheck disable=SC2086
    cmd=($PY main_moco_mgd.py $DATA "${COMMON[@]}" $shape -a resnet18 $flags --seed 0 --mlp --aug-plus --cos
         --moco-m 0.99 --shuffle-bn-splits 8 -p 20 --knn-freq $((epochs / 5)) --knn-k 20 --knn-t 0.07
         --keep-checkpoints 1 --output-dir "$dir")
    echo "\$ ${cmd[*]}" >> "$dir/stdout.txt"
    "${cmd[@]}" >> "$dir/stdout.txt" 2>&1
  fi
  linear_probe "$dir" "$shape" --pretrained "$last"
  echo "$name: kNN $(grep -o 'after [0-9]* epoch(s): top1 [0-9.]*' "$dir/log.txt" | awk '{print $2":"$5}' | tr '\n' ' ')" \
       "linear $(grep -o '"top1": [0-9.]*' "$dir/lincls/metrics.jsonl" | tail -1);" \
       "random weights: kNN $(grep -o 'features: top1 [0-9.]*' "$floor/lincls/log.txt" | awk '{print $3}')" \
       "linear $(grep -o '"top1": [0-9.]*' "$floor/lincls/metrics.jsonl" | tail -1)"
done
