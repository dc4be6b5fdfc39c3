#!/usr/bin/env bash
# One scripted GPU validation run (see scripts/gpu_validate.py for the steps, budgets and prepare).
#   scripts/gpu_validate.sh prepare    before the window (any machine)
#   scripts/gpu_validate.sh run        on the GPU, within --budget seconds (default 600)
#   scripts/gpu_validate.sh dry-run    on a CPU machine: plumbing and time accounting
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_validate.py "$@"
