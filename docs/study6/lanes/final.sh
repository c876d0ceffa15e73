#!/usr/bin/env bash
# Study 6, parts 2 and 6: the rows scored once on the 10,000 test images, 3 seeds, every student paired
# with the baseline of its seed (ROOT/final/base), with the recipe of part 1 and the loss factor chosen
# on the held-out images (part 4, select.sh). Rows, in the order the issue spends the cores on them:
#   base          MoCo-v2 ResNet-18 baseline and random weights
#   sup           MGD-AMP from the supervised ResNet-50 (6 epochs): the positive control
#   random        MGD-AMP from a random-weight ResNet-50 as initialised: control (a)
#   random_bn     ... with its BN statistics re-estimated on the training images: control (b)
#   random_match  control (a) with its first-epoch MGD loss matched to sup's through the factor: control (c)
#   sup1, sup2    the teacher ladder: the supervised ResNet-50 after 1 and 2 epochs (supN: after N epochs;
#                 sup12 is the rung above row sup's 6)
#   moco          MGD-AMP from the MoCo-v2 ResNet-50 of moco_teacher.sh (ROOT/moco_teacher)
#   moco_disco    DisCo and DisCo + MGD-AMP from it (the embedding losses need its MoCo-v2 head; after row moco)
#   moco_bingo    BINGO and BINGO + MGD-AMP from it
#   moco_rest     CCKD, SEED and each + MGD-AMP from it
# The MoCo-v2 teacher's students use the factor chosen with the supervised teacher (no selection of their own).
# Resumable: a finished run is not redone.
#   bash docs/study6/lanes/final.sh ROOT [ROW ...]      (from the repository root)
# The loss factor is the one select.sh's rule chose (ROOT/select/chosen_factor); LOSS_FACTOR=F overrides it.
set -euo pipefail
BASE=${1:?output directory}; ROOT=$BASE/final; shift
ROWS=("$@"); [ ${#ROWS[@]} -gt 0 ] || ROWS=(base sup random random_bn random_match sup1 sup2)
PY=${PYTHON:-.venv/bin/python}
LF=${LOSS_FACTOR:-$(cat "$BASE/select/chosen_factor" 2>/dev/null || true)}
[ -n "$LF" ] || { echo "no loss factor: run select.sh on ROOT first, or set LOSS_FACTOR" >&2; exit 2; }
echo "loss factor $LF"
RECIPE=(--images 2048 --image-size 32 --epochs 20 -b 64 --lr 0.0075 --moco-k 1024 --crop-min "${CROP_MIN:-0.8}"
        --knn-freq 4 --mgd-schedule authors --mgd-samples 2048 -j 2 --seeds 0 1 2)
student() {  # DIR, then the teacher's flags
  local dir=$1; shift
  $PY experiments/fashion_mnist.py --output-dir "$ROOT/$dir" "${RECIPE[@]}" --methods mgd-amp --baseline-from "$ROOT/base" "$@"
}
from_moco() {  # DIR, then the methods
  local dir=$1; shift
  [ -f "$BASE/moco_teacher/checkpoint_0023.pth.tar" ] || { echo "run moco_teacher.sh $BASE first" >&2; exit 2; }
  local teacher=(--teacher-checkpoint "$BASE/moco_teacher/checkpoint_0023.pth.tar")   # evaluated once, in row moco
  [ "$dir" = moco ] || teacher=(--teacher-from "$ROOT/moco")
  $PY experiments/fashion_mnist.py --output-dir "$ROOT/$dir" "${RECIPE[@]}" --baseline-from "$ROOT/base" \
      "${teacher[@]}" --mgd-loss-factor "$LF" --methods "$@"
}
first_epoch_mgd() {  # the mean MGD loss of seed 0's first epoch in DIR
  $PY -c "import json,sys; print(next(r['mgd'] for r in map(json.loads, open(sys.argv[1])) if r['kind'] == 'epoch'))" \
      "$ROOT/$1/seed0/mgd-amp/metrics.jsonl"
}
for row in "${ROWS[@]}"; do
  case $row in
    base) $PY experiments/fashion_mnist.py --output-dir "$ROOT/base" "${RECIPE[@]}" --methods baseline ;;
    sup) student sup --teacher-kind supervised --teacher-epochs 6 --mgd-loss-factor "$LF" ;;
    sup[0-9]*) student "$row" --teacher-kind supervised --teacher-epochs "${row#sup}" --mgd-loss-factor "$LF" ;;
    random) student random --teacher-kind random --mgd-loss-factor "$LF" ;;
    random_bn) student random_bn --teacher-kind random-bn --mgd-loss-factor "$LF" ;;
    random_match)
      # The MGD loss is the summed distance over batch x factor: scaling the factor by the ratio of the
      # two first-epoch losses gives the random teacher's students the trained teacher's loss size.
      factor=$($PY -c "import sys; print(float(sys.argv[1]) * float(sys.argv[2]) / float(sys.argv[3]))" \
               "$LF" "$(first_epoch_mgd random)" "$(first_epoch_mgd sup)")
      echo "control (c): loss factor $factor"
      student random_match --teacher-from "$ROOT/random" --mgd-loss-factor "$factor" ;;
    moco) from_moco moco mgd-amp ;;
    moco_disco) from_moco moco_disco disco mgd-amp+disco ;;
    moco_bingo) from_moco moco_bingo bingo mgd-amp+bingo ;;
    moco_rest) from_moco moco_rest cckd seed mgd-amp+cckd mgd-amp+seed ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
done
