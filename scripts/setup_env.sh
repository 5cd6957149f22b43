#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install timm-stitch with its test extras.
# As root with apt-get, Debian's chromium and chromium-driver are installed too when missing (the route explorer's
# browser test drives them; without them that test is skipped, saying why).
# On this project's machines torch 2.14.1 + torchvision 0.29.1 come from a local wheel store; set
# TORCH_PACKAGES to install another pair elsewhere (for example a CPU build from the PyTorch index).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_PACKAGES="${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_PACKAGES (about 1 minute from a local wheel store, longer from the network)"
    # pip's own lines (collecting, downloading, installing) show progress; a progress bar where a terminal is open
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --progress-bar on $TORCH_PACKAGES 2>&1 | grep --line-buffered -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch, torchvision"
fi
if ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's chromium and chromium-driver (for the explorer's browser test)"
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
        || echo "[setup] could not install chromium; the explorer's browser test will be skipped"
fi
echo "[setup] installing timm-stitch[test]"
"$VENV/bin/pip" install -q -e ".[test]" 2>&1 | grep --line-buffered -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import timm_stitch"
