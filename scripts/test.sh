#!/usr/bin/env bash
# The test suite: set up .venv if needed, lint, then run every test (the slow full-size ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
