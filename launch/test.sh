#!/usr/bin/env bash
# The test suite: creates .venv if missing, installs mmjax with its test extras, runs pytest.
# Usage: bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# Two workers: much of a test is a single-threaded XLA compile, so two keep both cores busy.
# Arguments come after, so `-n 0` runs in one process.
exec .venv/bin/python -m pytest -n "${MMJAX_TEST_WORKERS:-2}" "$@"
