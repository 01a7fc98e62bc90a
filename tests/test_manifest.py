"""The installed plugin's npe2 manifest is valid and every command it names can be imported."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_npe2_validate_with_imports():
    exe = shutil.which("npe2") or str(Path(sys.executable).with_name("npe2"))
    if not Path(exe).exists():
        pytest.skip("npe2 is not installed (it comes with napari and with the testing extra)")
    run = subprocess.run([exe, "validate", "--imports", "napari-segdiff"], capture_output=True, text=True)
    assert run.returncode == 0 and "valid" in run.stdout, run.stdout + run.stderr
