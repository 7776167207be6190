#!/usr/bin/env bash
# The main job, start to finish on the embedded digits (no download, CPU is enough):
#   train DiR-Tiny/2 on scikit-learn's digits -> sample 20 per class -> score them.
# Usage: bash scripts/demo.sh [extra train overrides, e.g. --max_steps 100]
# Outputs: runs/digits/{checkpoints/,loss.png,log.jsonl,samples_eval/grid.png,samples_eval/samples.npz,eval.json}
set -euo pipefail
start=$(date +%s)
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"  # creates .venv on first use
PY=python

"$PY" -m backends.torch.train -c configs/train/digits.yaml "$@"
"$PY" -m backends.torch.sample -c configs/sample/digits.yaml
"$PY" -m tools.eval_digits runs/digits/samples_eval/samples.npz --json runs/digits/eval.json --min-accuracy 0.9

echo "demo finished in $(( $(date +%s) - start )) s; grid: runs/digits/samples_eval/grid.png, scores: runs/digits/eval.json"
