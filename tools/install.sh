#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install bitgen with its test extras, CPU JAX.
# Idempotent: re-running only installs what changed. Set BITGEN_WITH_TORCH=1 for the optional
# official .pt import (torch==2.13.0, CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
extras="cpu,test"
if [ "${BITGEN_WITH_TORCH:-0}" = "1" ]; then extras="$extras,torch"; fi
.venv/bin/python -m pip install --quiet -e ".[$extras]"
