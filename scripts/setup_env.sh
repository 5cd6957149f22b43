#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install timm-stitch with its test extras.
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
echo "[setup] installing timm-stitch[test]"
"$VENV/bin/pip" install -q -e ".[test]" 2>&1 | grep --line-buffered -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import timm_stitch"
