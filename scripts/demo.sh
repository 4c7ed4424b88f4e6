#!/usr/bin/env bash
# Set up (or reuse) the virtual environment and run the embedded demo (phantom data, ~3 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
./scripts/setup.sh
VENV=${XRAYLENS_VENV:-.venv}
"$VENV/bin/xraylens" demo "$@"
