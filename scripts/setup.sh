#!/usr/bin/env bash
# Set up a virtual environment in .venv with torch pinned to the CPU wheel (an unpinned torch pulls a
# multi-GB CUDA build), then napari-segdiff with napari and the test tools. GPU users: install the torch
# build for your CUDA first (https://pytorch.org), then run the last pip line only.
# Run as root on Debian/Ubuntu, it also installs Xvfb and the X libraries Qt needs, so the napari GUI tests
# run on a machine without a screen (pytest-xvfb starts Xvfb by itself); without root they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v Xvfb >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # best effort: without a package mirror the GUI tests are skipped, the rest of the set-up goes on
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends xvfb xauth libxcb-icccm4 \
        libxcb-keysyms1 libxcb-image0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 \
        libx11-xcb1 libglib2.0-0 libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libdbus-1-3 libfontconfig1 \
        libxcb-xinerama0 >/dev/null; } ||
      echo "note: could not install Xvfb with apt-get: the napari GUI tests will be skipped"
  else
    echo "note: Xvfb is not installed and this is not root: the napari GUI tests will be skipped" \
         "(install it with: sudo apt-get install xvfb)"
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[testing]"
echo "napari-segdiff is set up in .venv (activate with: source .venv/bin/activate)"
