"""The tree stays clean under the project's ruff rules (pyproject.toml [tool.ruff]): lint and format."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (it comes with the testing extra: pip install -e '.[testing]')")
    return [exe]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_clean(args):
    run = subprocess.run(_ruff() + args, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"ruff {' '.join(args)} found problems (fix: ruff {args[0]} --fix .):\n{run.stdout}"
