#!/usr/bin/env bash
# The main job, start to finish on the embedded digits (no download, CPU is enough):
#   train DiR-Tiny on scikit-learn's digits -> sample 20 per class -> score them.
# Usage: bash scripts/demo.sh [torch|paddle|mindspore] [extra train overrides, e.g. --max_steps 100]
# Outputs (torch): runs/digits/{checkpoints/,loss.png,log.jsonl,samples_eval/grid.png,samples_eval/samples.npz,eval.json}
# Paddle writes to runs/digits_paddle/, MindSpore to runs/digits_mindspore/.
set -euo pipefail
start=$(date +%s)
backend=torch
if [[ $# -gt 0 && $1 != -* ]]; then
  backend=$1
  shift
fi
case "$backend" in
  torch) run_dir=runs/digits ;;
  paddle) run_dir=runs/digits_paddle ;;
  mindspore)
    run_dir=runs/digits_mindspore
    # Graph mode is several times faster than PyNative on CPU; DIR_MINDSPORE_MODE=pynative (or
    # --mode pynative for training) picks PyNative.
    export DIR_MINDSPORE_MODE="${DIR_MINDSPORE_MODE:-graph}" ;;
  *) echo "error: backend '$backend' unknown; expected torch, paddle or mindspore" >&2; exit 2 ;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" requirements/dev.txt  # creates .venv on first use
PY=python

"$PY" -m "backends.$backend.train" -c configs/train/digits.yaml --run_dir "$run_dir" "$@"
"$PY" -m "backends.$backend.sample" -c configs/sample/digits.yaml --ckpt "$run_dir" --out_dir "$run_dir/samples_eval"
"$PY" -m tools.eval_digits "$run_dir/samples_eval/samples.npz" --json "$run_dir/eval.json" --min-accuracy 0.9

echo "demo ($backend) finished in $(( $(date +%s) - start )) s; grid: $run_dir/samples_eval/grid.png, scores: $run_dir/eval.json"
