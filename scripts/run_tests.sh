#!/usr/bin/env bash
# Runs the test suite in a virtual environment (.venv, created or reused), installing what it needs.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not multigpu"`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # On this project's CPU machines torch==2.13.0 is the offline CPU build; GPU users install theirs first.
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -r requirements.txt -r requirements-test.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
exec .venv/bin/python -m pytest "$@"
