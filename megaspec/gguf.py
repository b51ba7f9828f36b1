"""A GGUF file as --model: dequantized once into a plain HF folder in the cache, which everything else loads.

transformers reads a GGUF (llama.cpp's format) and dequantizes it into a LlamaForCausalLM, but only
as a whole model in one process: it cannot load partitioned under ZeRO-3 (zero.Init), and the
model it returns refuses save_pretrained. So a .gguf --model is converted once per machine:

- the model is dequantized to the run's dtype (fp32 on CPU ranks, bf16 where the run trains in
  bf16) and saved with its tokenizer and chat template (save_pretrained, safetensors) under
  `$MEGASPEC_CACHE/gguf/<name>-<key>-<dtype>/`, the key being a digest of the file's absolute path,
  size and modification time;
- the folder is written under a temp name and renamed into place, and an exclusive file lock
  (fcntl, no torch.distributed) makes concurrent ranks and processes convert once while the others
  wait for it;
- training, validation, export and generation then see a plain HF folder (ZeRO-3 loads it
  partitioned). The limit: the conversion holds the whole model once in host memory, in one process.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from megaspec.model import SUPPORTED_MODEL_TYPES
from megaspec.train.dsconfig import ConfigError, resolve_ds_config
from megaspec.train.embedded import cache_root

MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType) and the byte size of the fixed-size ones
STRING, ARRAY = 8, 9
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
HEADER_KEYS_READ = 64  # general.architecture comes first in files written by llama.cpp's tools


def is_gguf(model: str | os.PathLike | None) -> bool:
    """Whether --model names a GGUF file (by its .gguf suffix)."""
    return model is not None and str(model).lower().endswith(".gguf")


def run_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype a run with this (raw) DeepSpeed config computes in: bf16 when it resolves bf16 on, else fp32."""
    resolved = resolve_ds_config(ds_config, lr=1.0, max_steps=1, warmup_steps=1, hidden_size=1)
    return torch.bfloat16 if resolved.get("bf16", {}).get("enabled") is True else torch.float32


def _read_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8", errors="replace")


def gguf_architecture(path: Path) -> str | None:
    """The file's general.architecture, read from its header only; None when it is not among the first keys.

    Raises ConfigError when the file is not a GGUF file (wrong magic, cut short).
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise ConfigError(f"--model {path} is not a GGUF file (no GGUF magic bytes); pass a .gguf written by "
                                  "llama.cpp, or an HF model folder")
            _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            for _ in range(min(n_kv, HEADER_KEYS_READ)):
                key = _read_string(f)
                (kind,) = struct.unpack("<I", f.read(4))
                if kind == STRING:
                    value = _read_string(f)
                    if key == "general.architecture":
                        return value
                elif kind in SCALAR_SIZES:
                    f.read(SCALAR_SIZES[kind])
                else:
                    return None  # an array before the architecture: leave the check to transformers
    except struct.error:
        raise ConfigError(f"--model {path}: the GGUF header is cut short; the file is truncated, download it again") from None
    return None


def check_gguf(path: Path) -> None:
    """Refuse, from the header alone, a .gguf --model that is missing, not GGUF, or not a LLaMA-style decoder."""
    if not path.exists():
        raise ConfigError(f"--model {path} does not exist; pass an existing .gguf file or an HF model folder")
    if not path.is_file():
        raise ConfigError(f"--model {path} is a folder named .gguf; pass the .gguf file itself")
    arch = gguf_architecture(path)
    if arch is not None and arch not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"--model {path} is a {arch} model; megaspec supports LLaMA-style decoders "
                          f"({', '.join(SUPPORTED_MODEL_TYPES)}) whose layers have q/k/v/o_proj and gate/up/down_proj")


def converted_folder(path: Path, dtype: torch.dtype) -> Path:
    """Where the HF copy of the GGUF file `path` in `dtype` lives in the cache (it may not exist yet)."""
    path = path.expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}-{str(dtype).removeprefix('torch.')}"


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (other processes block here until it is released)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert(path: Path, out: Path, dtype: torch.dtype) -> None:
    """Dequantize the GGUF file `path` into an HF folder `out` (model in `dtype`, tokenizer, chat template), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except ImportError as e:
        raise ConfigError(f"--model {path}: reading GGUF needs the gguf package ({e}); pip install gguf") from e
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model {path}: transformers cannot convert this GGUF ({first}); pass an HF model folder instead") from e
    # the weights are plain dense tensors now; the GGUF "quantizer" only stops save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "SOURCE").write_text(f"{path}\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_folder(model: str | os.PathLike, dtype: torch.dtype, log: Any = print) -> Path:
    """The HF folder of a .gguf --model in `dtype`: converted on first use (one process does it, the others wait)."""
    path = Path(model).expanduser()
    check_gguf(path)
    out = converted_folder(path, dtype)
    if (out / "config.json").is_file():
        return out
    with exclusive(out.with_name(f".{out.name}.lock")):
        if not (out / "config.json").is_file():  # another process may have finished it while we waited
            if log is not None:
                log(f"converting {path} to an HF folder in {str(dtype).removeprefix('torch.')} (once per machine) -> {out}")
            start = time.perf_counter()
            convert(path.resolve(), out, dtype)
            if log is not None:
                log(f"converted {path.name} in {time.perf_counter() - start:.0f} s")
    return out


def resolve_model(model: str | None, dtype: torch.dtype, log: Any = print) -> str | None:
    """--model as training loads it: a .gguf becomes its converted HF folder; anything else is returned as is."""
    if not is_gguf(model):
        return model
    return str(hf_folder(model, dtype, log))
