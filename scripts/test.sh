#!/usr/bin/env bash
# Set up .venv (all three backends) and run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" requirements/dev.txt  # explicit: a sourced script would see our "$@"
exec python -m pytest -q -n 2 --dist loadfile "$@"
