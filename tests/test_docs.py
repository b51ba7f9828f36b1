"""Every place the code cites docs/methods.md or docs/design.md names a section that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITING = ("megaspec", "launch", "tests", "slurm", "README.md", "BENCHMARKS.md", "docs")


def _cited_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", *CITING], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / name for name in listed if name.endswith((".py", ".md", ".sh", ".sbatch"))]


def _headings(page: str) -> list[str]:
    return [line.lstrip("#").strip() for line in (ROOT / "docs" / page).read_text().splitlines() if line.startswith("#")]


def test_every_methods_section_cited_exists():
    numbers = {h.split(" ", 1)[0].rstrip(".") for h in _headings("methods.md") if h[:1].isdigit()}
    cited = []
    for path in _cited_files():
        for match in re.finditer(r"methods\.md §([\d.]+)(?:-([\d.]+))?(?:, (\d+))?", path.read_text()):
            cited += [(path.name, number) for number in match.groups() if number]
    if not cited:
        pytest.skip("not a git checkout")
    assert [c for c in cited if c[1] not in numbers] == []
    s2ft = (ROOT / "docs" / "methods.md").read_text().split("## 4.")[1].split("## 5.")[0]
    assert all(f"step {k}" in s2ft for k in (1, 2, 3))


def test_every_design_section_cited_exists():
    headings = set(_headings("design.md"))
    cited = [(p.name, m) for p in _cited_files() for m in re.findall(r'design\.md "([^"]+)"', p.read_text())]
    assert cited and [c for c in cited if c[1] not in headings] == []


def test_the_old_out_of_repo_names_are_gone():
    stale = [p.name for p in _cited_files() if re.search(r"\b(METHODS|DESIGN)\.md", p.read_text())]
    assert stale == []
