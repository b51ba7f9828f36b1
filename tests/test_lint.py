"""ruff lints every tracked Python file, so a lint error anywhere (megaspec/distributed/ included) fails CI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff")
pytestmark = pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -e '.[dev]')")


def test_ruff_sees_every_tracked_python_file():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    shown = subprocess.run([RUFF, "check", "--show-files", "."], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    linted = {str(Path(line).resolve().relative_to(ROOT)) for line in shown.split() if line.endswith(".py")}
    assert sorted(set(tracked) - linted) == []


def test_a_lint_error_in_the_distributed_package_fails(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    package = tmp_path / "megaspec" / "distributed"
    package.mkdir(parents=True)
    (package / "comm.py").write_text('"""A module with an unused import."""\n\nimport os\n')
    result = subprocess.run([RUFF, "check", "."], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and "F401" in result.stdout
