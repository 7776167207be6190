#!/usr/bin/env bash
# Build .venv-paddle-vae: the Paddle backend plus ppdiffusers' AutoencoderKL, for latent models on Paddle.
# It is an environment of its own because ppdiffusers 0.29 pulls paddlenlp and pins (dill, numpy,
# protobuf, ...) that break MindSpore 2.10 in the main .venv. Safe to run again.
# Usage: bash scripts/setup_paddle_vae_env.sh     then: .venv-paddle-vae/bin/python -m backends.paddle.sample ...
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
cd "$REPO_ROOT"
if [[ ! -x .venv-paddle-vae/bin/python ]]; then
  "$PYTHON" -m venv .venv-paddle-vae
fi
marker=".venv-paddle-vae/.installed-$(cat requirements/paddle-vae.txt requirements/paddle.txt requirements/common.txt | sha1sum | cut -c1-12)"
if [[ ! -f "$marker" ]]; then
  .venv-paddle-vae/bin/python -m pip install -q --upgrade pip
  .venv-paddle-vae/bin/python -m pip install -q -r requirements/paddle-vae.txt pytest==9.2.0
  .venv-paddle-vae/bin/python -c "from ppdiffusers import AutoencoderKL; import paddle; print('ppdiffusers AutoencoderKL ok, paddle', paddle.__version__)"
  touch "$marker"
fi
