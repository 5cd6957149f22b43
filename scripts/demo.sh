#!/usr/bin/env bash
# The main job, offline: set up .venv if needed, then run the shipped Fashion-MNIST SN-Net demo.
# Debian's dataset-fashion-mnist (all 10,000 test images) is installed when missing and apt-get can run as root;
# without it the demo uses the 1,000 test images shipped with the package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[demo] installing Debian's dataset-fashion-mnist"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
        || echo "[demo] could not install dataset-fashion-mnist; using the shipped 1,000-image test sample"
fi
exec .venv/bin/python -m timm_stitch.demo "$@"
