#!/usr/bin/env bash
# The main job, start to finish on the embedded digits (no download, CPU is enough):
#   train DiR-Tiny on scikit-learn's digits -> sample 20 per class -> score them.
# Usage: bash scripts/demo.sh [torch|paddle|mindspore] [ddpm|flow|text] [extra train overrides, e.g. --max_steps 100]
#   ddpm: configs/{train,sample}/digits.yaml       (DiT's DDPM recipe, cosine schedule, DDIM 50 steps)
#   flow: configs/{train,sample}/digits_flow.yaml  (SiT's flow matching, linear path, Heun 25 evaluations)
#   text: configs/{train,sample}/digits_text.yaml  (captions through an RWKV-6 text encoder, as Di-R; sampled
#         with the four phrasings held out of training, 20 images per digit)
# Outputs go to runs/digits[_flow|_text][_paddle|_mindspore]/: checkpoints/, loss.png, log.jsonl,
# samples_eval/{grid.png,samples.npz,info.json}, eval.json.
set -euo pipefail
start=$(date +%s)
backend=torch
objective=ddpm
if [[ $# -gt 0 && $1 != -* ]]; then
  backend=$1
  shift
fi
if [[ $# -gt 0 && $1 != -* ]]; then
  objective=$1
  shift
fi
case "$objective" in
  ddpm) config=digits; run_dir=runs/digits ;;
  flow) config=digits_flow; run_dir=runs/digits_flow ;;
  text) config=digits_text; run_dir=runs/digits_text ;;
  *) echo "error: objective '$objective' unknown; expected ddpm, flow or text" >&2; exit 2 ;;
esac
case "$backend" in
  torch) ;;
  paddle) run_dir=${run_dir}_paddle ;;
  mindspore) run_dir=${run_dir}_mindspore ;;  # Graph mode, the default (--mindspore_mode pynative to compare)
  *) echo "error: backend '$backend' unknown; expected torch, paddle or mindspore" >&2; exit 2 ;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" requirements/dev.txt  # creates .venv on first use
PY=python

"$PY" -m "backends.$backend.train" -c "configs/train/$config.yaml" --run_dir "$run_dir" "$@"
"$PY" -m "backends.$backend.sample" -c "configs/sample/$config.yaml" --ckpt "$run_dir" --out_dir "$run_dir/samples_eval"
"$PY" -m tools.eval_digits "$run_dir/samples_eval/samples.npz" --json "$run_dir/eval.json" --min-accuracy 0.9

echo "demo ($backend, $objective) finished in $(( $(date +%s) - start )) s; grid: $run_dir/samples_eval/grid.png, scores: $run_dir/eval.json"
