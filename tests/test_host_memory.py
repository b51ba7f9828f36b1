"""The fixed glibc mmap threshold that keeps a rank's resident memory at its tensors (issue 16, item 7)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaspec.train.host_memory import DEFAULT_THRESHOLD, ENV, threshold_from_env

REPO = Path(__file__).resolve().parents[1]

# A freed 16 MiB tensor raises glibc's dynamic threshold to 16 MiB; 200 tensors of 4 MiB then come
# from the heap, and freeing all but the last (the top of the heap) returns nothing to the system.
SCENARIO = """
import sys, torch
from megaspec.train.host_memory import fix_mmap_threshold
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold() == 131072
big = torch.ones(4 << 20)
del big
base = rss()
kept = [torch.ones(1 << 20) for _ in range(200)][-1:]
print((rss() - base) / 2**20)
"""


def _retained_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", ENV)}
    out = subprocess.run([sys.executable, "-c", SCENARIO, mode], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_fixed_threshold_returns_freed_activations_to_the_system():
    live = 4.0  # MiB: one 4 MiB tensor is all that stays alive
    assert _retained_mib("dynamic") > 700  # glibc's default keeps ~800 MiB of freed heap resident
    assert _retained_mib("fixed") == pytest.approx(live, abs=2.0)


@pytest.mark.parametrize(("text", "expected"), [("", DEFAULT_THRESHOLD), ("0", None), ("off", None), ("1048576", 1048576)])
def test_threshold_from_env(monkeypatch, text, expected):
    monkeypatch.setenv(ENV, text)
    assert threshold_from_env() == expected


@pytest.mark.parametrize("text", ["lots", "-1", str(64 << 20)])
def test_bad_threshold_is_one_line_exit_2(text):
    env = dict(os.environ, **{ENV: text})
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "launch/train.py", "--max_steps", "1"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and ENV in lines[0], out.stderr
