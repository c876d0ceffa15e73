#!/usr/bin/env bash
# Study 6, part 4: the MGD loss factor chosen on the held-out images (--val-holdout 0.1), never the
# test set: MGD-AMP from the supervised ResNet-50 at factors 1e1, 3e1 and 1e2, seed 0, paired with the
# baseline of the same seed, with the recipe of part 1. Resumable (a finished run is not redone).
# The rule, fixed before any of these runs: the factor whose student scores the highest held-out linear
# top-1 (MoCo's protocol); a tie goes to the higher kNN top-1. It is written to ROOT/select/chosen_factor.
#   bash docs/study6/lanes/select.sh ROOT        (from the repository root; writes ROOT/select/*)
set -euo pipefail
OUT=${1:?output directory}/select
PY=${PYTHON:-.venv/bin/python}
RECIPE=(--images 2048 --image-size 32 --epochs "${EPOCHS:-20}" -b 64 --lr 0.0075 --moco-k 1024 --crop-min "${CROP_MIN:-0.8}"
        --knn-freq 4 --mgd-schedule authors --mgd-samples 2048 -j 2 --val-holdout 0.1 --seeds 0)
$PY experiments/fashion_mnist.py --output-dir "$OUT/base" "${RECIPE[@]}" --methods baseline
$PY experiments/fashion_mnist.py --output-dir "$OUT/sup_lf30" "${RECIPE[@]}" --methods mgd-amp \
    --teacher-kind supervised --teacher-epochs 6 --mgd-loss-factor 30 --baseline-from "$OUT/base"
for factor in 10 100; do
  $PY experiments/fashion_mnist.py --output-dir "$OUT/sup_lf$factor" "${RECIPE[@]}" --methods mgd-amp \
      --teacher-from "$OUT/sup_lf30" --mgd-loss-factor $factor --baseline-from "$OUT/base"
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
scores = {}
for factor in ("10", "30", "100"):
    result = json.loads((out / f"sup_lf{factor}" / "seed0" / "mgd-amp" / "result.json").read_text())
    assert result["val_holdout"] > 0, "selection must read held-out scores"
    scores[factor] = (result["linear_top1"], result["knn_top1"])
    print(f"factor {factor}: held-out linear {scores[factor][0]:.2f} kNN {scores[factor][1]:.2f}")
chosen = max(scores, key=scores.get)
print(f"chosen loss factor: {chosen}")
(out / "chosen_factor").write_text(chosen + "\n")
PY
