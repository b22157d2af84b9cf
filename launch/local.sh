#!/usr/bin/env bash
# The demo on this machine: creates .venv if missing, installs mmjax, runs `mmjax demo` on the
# embedded shapes data. Usage: bash launch/local.sh [--workdir DIR] [demo flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
if [[ " $* " != *" --workdir"* ]]; then
  set -- --workdir runs/demo "$@"
fi
exec .venv/bin/mmjax demo "$@"
