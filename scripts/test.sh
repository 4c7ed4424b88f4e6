#!/usr/bin/env bash
# Set up (or reuse) the virtual environment, lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
./scripts/setup.sh test
./scripts/system-deps.sh
VENV=${XRAYLENS_VENV:-.venv}
"$VENV/bin/ruff" check src tests bench
"$VENV/bin/ruff" format --check src tests bench
"$VENV/bin/python" -m pytest -q "$@"
