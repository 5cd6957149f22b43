#!/usr/bin/env bash
# The test suite: set up .venv if needed, lint, then run every test (the slow full-size ones included) in two
# pytest-xdist workers, a test file each at a time (the tests run torch on one thread; `-n 0` runs them in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
