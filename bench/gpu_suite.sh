#!/usr/bin/env bash
# Every GPU figure from one call: unpack the carried data and wheels (once), then bench/gpu_suite.py.
#
#   bench/gpu_suite.sh --prepare          # on the development machine: build gpu_carry/ (see below)
#   bench/gpu_suite.sh [gpu_suite.py options]   # on the GPU machine (or anywhere: --tiny --device cpu)
#
# gpu_carry/ (git-ignored through .git/info/exclude) holds what a bare GPU machine lacks:
#   wheels/            captum, grad-cam (built from its sdist) and ttach (grad-cam's one dependency the
#                      GPU image lacks), installed with --no-index --no-deps; the suite reports
#                      "not installed" for a peer whose wheel is missing instead of failing
#   data.tar.part-*    knee_kl/, pneumonia/ and fixture/ of ../shared/data as a tar cut in 50 MiB parts,
#                      so each part fits one call's 64 MiB working-tree limit; parts accumulate on the
#                      machine between calls and are unpacked into gpu_carry/data/ when all are there
# The results go to $OUT (when set, as on the device machine) or gpu_carry/: gpu_suite_cuda.json and
# gpu_suite.txt (the table). docs/benchmarks.md gives the exact sequence of device calls.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${XRAYLENS_CARRY:-gpu_carry}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ "${1:-}" = "--prepare" ]; then
  SRC=${XRAYLENS_DATA:-../shared/data}
  case "$CARRY" in
    /*) ;; # outside the repository: nothing to ignore
    *) grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >>.git/info/exclude ;;
  esac
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/sdist"
  "$PY" -m pip download --quiet --no-deps -d "$CARRY/wheels" captum==0.9.0 ttach==0.0.3
  "$PY" -m pip download --quiet --no-deps --no-binary grad-cam -d "$CARRY/sdist" grad-cam==1.5.7
  "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$CARRY/wheels" "$CARRY"/sdist/grad*cam-*.tar.gz
  rm -rf "$CARRY/sdist"
  tar -C "$SRC" -cf - knee_kl pneumonia fixture | split -b 50M - "$CARRY/data.tar.part-"
  ls -l "$CARRY" "$CARRY/wheels"
  echo "carry: $(cd "$CARRY" && ls -d wheels data.tar.part-* | sed "s|^|$CARRY/|" | tr '\n' ' ')"
  exit 0
fi

DATA_ROOT=${XRAYLENS_DATA:-}
if [ -z "$DATA_ROOT" ]; then
  if ls "$CARRY"/data.tar.part-* >/dev/null 2>&1; then
    if [ ! -f "$CARRY/data/.complete" ]; then
      rm -rf "$CARRY/data" && mkdir -p "$CARRY/data"
      cat "$CARRY"/data.tar.part-* | tar -x -C "$CARRY/data"
      touch "$CARRY/data/.complete"
    fi
    DATA_ROOT=$CARRY/data
  else
    DATA_ROOT=../shared/data
  fi
fi
if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-index --no-deps "$CARRY"/wheels/*.whl ||
    echo "gpu_suite.sh: wheels not installed; the suite reports those peers as not installed" >&2
fi
OUTDIR=${OUT:-$CARRY}
mkdir -p "$OUTDIR"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export XRAYLENS_CACHE=${XRAYLENS_CACHE:-$CARRY/cache}
export HF_HUB_OFFLINE=1
DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
"$PY" bench/gpu_suite.py --data-root "$DATA_ROOT" --json "$OUTDIR/gpu_suite_$DEVICE.json" "$@" |
  tee "$OUTDIR/gpu_suite.txt"
