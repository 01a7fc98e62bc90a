#!/usr/bin/env bash
# Set up a virtual environment in .venv with torch pinned to the CPU wheel (an unpinned torch pulls a
# multi-GB CUDA build), then napari-segdiff with napari and the test tools. GPU users: install the torch
# build for your CUDA first (https://pytorch.org), then run the last line only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[testing]"
echo "napari-segdiff is set up in .venv (activate with: source .venv/bin/activate)"
