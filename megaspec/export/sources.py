"""Where the frozen base weights come from, one tensor at a time, in the same order on every rank.

`read(name, wanted)` is called by every rank for every name it needs from any rank, so a source
that gathers (ZeRO-3) can treat it as a collective; it returns the tensor only where `wanted`.

- CheckpointSource: the base's safetensors files, read tensor by tensor with safe_open (the default).
- ModelSource: a loaded base, module by module: ZeRO-3 partitioned parameters are gathered one at
  a time, and bitsandbytes 4/8-bit linears are dequantized with `dense_weight`, so a quantized
  run exports the weights it was trained against.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn

from megaspec.adapters import dense_weight, is_quantized
from megaspec.distributed import gather_params
from megaspec.export.run import ExportError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Source(Protocol):
    """The base's tensors by checkpoint name."""

    def names(self) -> list[str]:
        """Every tensor name, in a fixed order (identical on every rank)."""
        ...

    def read(self, name: str, wanted: bool) -> torch.Tensor | None:
        """The tensor (dense, dequantized) if `wanted`, else None; called on every rank in `names` order."""
        ...


def local_model_folder(model: str) -> Path:
    """A local folder for a model path or hub id (the hub snapshot's safetensors and json files)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith((".", "/", "~")):
        raise ExportError(f"base model folder {model} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt"]))


class CheckpointSource:
    """A HF checkpoint's safetensors shards (model.safetensors or model.safetensors.index.json)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if (self.folder / INDEX_NAME).is_file():
            files = sorted(set(json.loads((self.folder / INDEX_NAME).read_text())["weight_map"].values()))
        elif (self.folder / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise ExportError(f"base model {self.folder} has no {SINGLE_NAME} or {INDEX_NAME}")
        self.file_of: dict[str, str] = {}
        for file in files:
            with safe_open(str(self.folder / file), framework="pt") as f:
                self.file_of.update({name: file for name in f.keys()})

    def names(self) -> list[str]:
        return list(self.file_of)

    def read(self, name: str, wanted: bool) -> torch.Tensor | None:
        if not wanted:
            return None
        with safe_open(str(self.folder / self.file_of[name]), framework="pt") as f:
            return f.get_tensor(name)


class ModelSource:
    """A loaded base model's parameters and persistent buffers, named as in its state dict (tied ones once)."""

    def __init__(self, model: nn.Module) -> None:
        self.entries: dict[str, tuple[nn.Module, str, bool]] = {}
        seen: set[int] = set()
        for prefix, module in model.named_modules():
            tensors = [(k, p, True) for k, p in module.named_parameters(recurse=False)]
            tensors += [(k, b, False) for k, b in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set]
            for key, tensor, is_param in tensors:
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                self.entries[f"{prefix}.{key}" if prefix else key] = (module, key, is_param)

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, wanted: bool) -> torch.Tensor | None:
        module, key, is_param = self.entries[name]
        tensor = getattr(module, key)
        with gather_params([tensor]) if is_param else contextlib.nullcontext():
            if not wanted:
                return None
            if key == "weight" and is_quantized(module):
                return dense_weight(module).cpu()
            shape = getattr(tensor, "ds_shape", tensor.shape)
            return tensor.detach().reshape(shape).cpu().clone()
