"""Repository-level pytest setup.

* The tests run tiny networks, for which more than one torch thread only adds overhead (and thrashes badly
  when other processes share the 2 cores).
* Tests marked ``gui`` open napari windows and need an X display. pytest-xvfb (in the test extras) starts a
  virtual one by itself when the ``Xvfb`` binary is installed; where there is neither a display nor Xvfb
  they are skipped with a message that says how to run them, so the suite passes on a fresh machine.
"""

import os

import pytest
import torch

torch.set_num_threads(1)

NO_DISPLAY = (
    "no X display: napari GUI test skipped. Install Xvfb (Debian/Ubuntu: `sudo apt-get install xvfb`; "
    "scripts/setup.sh does this when run as root) and run the tests again: pytest-xvfb starts it by itself"
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    skip = pytest.mark.skip(reason=NO_DISPLAY)
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)
