#!/usr/bin/env bash
# Study 6, part 1: a scale-model recipe in which MoCo-v2 beats random weights. Baseline ResNet-18
# runs (no teacher) on 2,048 of the 54,000 kept training images, 32 px, kNN every 4 epochs and the
# linear probe at the end, all scored on the 6,000 held-out training images (--val-holdout 0.1),
# never on the test set. Random weights scored the same way. Resumable: a finished run is skipped,
# an unfinished one resumes from its last checkpoint.
#   bash docs/study6/lanes/recipe.sh OUT [NAME ...]     (from the repository root; NAME: the runs below)
set -euo pipefail
OUT=${1:?output directory}; shift
PY=${PYTHON:-.venv/bin/python}
DATA=/usr/share/datasets/fashion-mnist
COMMON=(--dataset fashion-mnist --image-size 32 --max-images 2048 --val-holdout 0.1 -j 2)
declare -A RUNS=(
  [lr0.0075]="-b 64 --lr 0.0075 --moco-k 1024 --epochs 20"
  [lr0.03]="-b 64 --lr 0.03 --moco-k 1024 --epochs 20"
  [lr0.06]="-b 64 --lr 0.06 --moco-k 1024 --epochs 20"
  [lr0.12]="-b 64 --lr 0.12 --moco-k 1024 --epochs 20"
  [b32_lr0.03]="-b 32 --lr 0.03 --moco-k 1024 --epochs 20"
  [lr0.06_t0.1]="-b 64 --lr 0.06 --moco-k 1024 --epochs 20 --moco-t 0.1"
  [lr0.06_40ep]="-b 64 --lr 0.06 --moco-k 1024 --epochs 40"
)
NAMES=("$@"); [ ${#NAMES[@]} -gt 0 ] || NAMES=(lr0.0075 lr0.03 lr0.06 lr0.12 b32_lr0.03)
random_floor() {  # random weights, seed 0: kNN and the linear probe on the held-out images
  local dir=$OUT/random/seed0
  [ -f "$dir/lincls/metrics.jsonl" ] && grep -q '"epoch": 99' "$dir/lincls/metrics.jsonl" && return
  mkdir -p "$dir/lincls"
  echo "\$ $PY main_lincls.py $DATA ${COMMON[*]} -a resnet18 --seed 0 ..." > "$dir/lincls/stdout.txt"
  rm -f "$dir/lincls/checkpoint.pth.tar" "$dir/lincls/metrics.jsonl"
  $PY main_lincls.py $DATA "${COMMON[@]}" -a resnet18 --seed 0 --cached-features --epochs 100 --schedule 60 80 \
      -p 1000 --knn-k 20 --knn-t 0.07 --output-dir "$dir/lincls" >> "$dir/lincls/stdout.txt" 2>&1
}
random_floor
for name in "${NAMES[@]}"; do
  dir=$OUT/$name/seed0
  flags=${RUNS[$name]}
  epochs=$(echo "$flags" | sed -E 's/.*--epochs ([0-9]+).*/\1/')
  last=$(printf "%s/checkpoint_%04d.pth.tar" "$dir" $((epochs - 1)))
  mkdir -p "$dir"
  if [ ! -f "$last" ]; then
    echo "\$ $PY main_moco_mgd.py $DATA ${COMMON[*]} $flags --seed 0 ..." >> "$dir/stdout.txt"
    # shellcheck disable=SC2086
    $PY main_moco_mgd.py $DATA "${COMMON[@]}" -a resnet18 $flags --seed 0 --mlp --aug-plus --cos --moco-m 0.99 \
        --moco-t "${MOCO_T:-0.2}" --shuffle-bn-splits 8 -p 20 --knn-freq 4 --knn-k 20 --knn-t 0.07 \
        --keep-checkpoints 1 --output-dir "$dir" >> "$dir/stdout.txt" 2>&1
  fi
  if ! grep -q '"epoch": 99' "$dir/lincls/metrics.jsonl" 2>/dev/null; then
    mkdir -p "$dir/lincls"; rm -f "$dir/lincls/checkpoint.pth.tar" "$dir/lincls/metrics.jsonl"
    $PY main_lincls.py $DATA "${COMMON[@]}" -a resnet18 --seed 0 --pretrained "$last" --cached-features --epochs 100 \
        --schedule 60 80 -p 1000 --output-dir "$dir/lincls" > "$dir/lincls/stdout.txt" 2>&1
  fi
  echo "$name: $(grep -o 'kNN (knn.*' "$dir/log.txt" | tr '\n' ';') linear $(tail -1 "$dir/lincls/metrics.jsonl")"
done
