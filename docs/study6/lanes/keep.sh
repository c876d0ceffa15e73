#!/usr/bin/env bash
# Copies what RESULTS.md reads of finished runs from ROOT into docs/study6 (the same paths below it): each
# run's result.json, metrics.jsonl and stdout.txt (its command), the experiment's results.md / results.json,
# the chosen factor and the teacher's sha256. Checkpoints and figures stay in ROOT.
#   bash docs/study6/lanes/keep.sh ROOT select final/base ...      (from the repository root)
set -euo pipefail
ROOT=${1:?output directory}; shift
for part in "$@"; do
  (cd "$ROOT" && find "$part" -type f \( -name result.json -o -name metrics.jsonl -o -name stdout.txt \
      -o -name 'results.md' -o -name 'results.json' -o -name chosen_factor -o -name sha256.txt \) -print0) |
    while IFS= read -r -d '' file; do
      mkdir -p "docs/study6/$(dirname "$file")"
      cp "$ROOT/$file" "docs/study6/$file"
    done
done
