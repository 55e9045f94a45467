"""One house style: `ruff format` and `ruff check` (configured in pyproject.toml) are clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["format", "--check", "."], ["check", "."]])
def test_tree_is_in_house_style(args):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, (
        f"ruff {' '.join(args)}:\n{out.stdout}{out.stderr}\nfix: ruff format ."
    )
