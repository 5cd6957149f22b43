#!/usr/bin/env bash
# The main job, offline: set up .venv if needed, then run the timm-stitch demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m timm_stitch.demo "$@"
