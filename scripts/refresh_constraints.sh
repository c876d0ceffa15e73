#!/usr/bin/env bash
# Rewrites constraints.txt: every package that a fresh venv gets from requirements-dev.txt, at the
# version it gets today. The README's test command (and so CI) installs with -c constraints.txt, so a
# new release of pytest, timm, setuptools or torch changes nothing here until this is run again:
# after changing a dependency (pyproject.toml, requirements*.txt), or to move to new releases.
# Then run the tests, and commit constraints.txt with the change. Takes a few minutes (pip's cache helps).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q -r requirements-dev.txt
{
    echo "# Every package the README's test command installs, pinned: written by scripts/refresh_constraints.sh"
    echo "# (pip freeze of a fresh venv built from requirements-dev.txt); refresh it with that script, not by hand."
    # --all keeps setuptools (test_wheel.py builds with it); pip is the venv's own, and this project is -e .
    "$venv/bin/pip" freeze --all --exclude-editable | grep -v '^pip=='
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
