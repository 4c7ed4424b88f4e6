#!/usr/bin/env bash
# Create or reuse the virtual environment and install xraylens into it.
# Usage: scripts/setup.sh [extra]   (extra = test to add the test-only oracles)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${XRAYLENS_VENV:-.venv}
PY=${PYTHON:-python3}
extra=${1:-}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python 3.11+ needed ($PY)"; exit 2; }
  "$PY" -m venv "$VENV"
fi
# Reinstall only when the dependency list changed: keeps repeated runs to a second.
stamp="$VENV/.xraylens-installed-${extra:-base}"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, pinned: pip takes these two from the local wheel store on this machine.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".${extra:+[$extra]}"
  echo "$want" > "$stamp"
fi
