"""A merged HF checkpoint, written shard by shard: W0 + dW for adapted layers, everything else copied.

Nothing holds a full model: the base is read one tensor at a time; the writer (rank 0) holds one
output shard and one layer. With several ranks each rank reconstructs only its contiguous block
of every adapted layer's rows (`delta_weight(row_ids)`: one 1-D transform per row for the
spectral methods, docs/methods.md §1.4), and the blocks are gathered to the writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from safetensors.torch import save_file

from megaspec.adapters import Adapter
from megaspec.distributed.comm import rank, world_size
from megaspec.export.run import ExportError, update_rows
from megaspec.export.sources import INDEX_NAME, SINGLE_NAME, Source

DEFAULT_SHARD_BYTES = 5 * 1024**3  # save_pretrained's default max_shard_size


def my_rows(m: int, me: int, world: int) -> torch.Tensor:
    """This rank's contiguous block of the rows 0..m-1 (blocks of ceil(m / world); the last may be short or empty)."""
    size = -(-m // world)
    return torch.arange(min(me * size, m), min((me + 1) * size, m))


def merged_rows(
    adapter: Adapter, weight: torch.Tensor, rows: torch.Tensor, block: int = 1024, trained: torch.Tensor | None = None
) -> torch.Tensor:
    """W0[rows] + dW[rows] in fp32 (dW in float64, see update_rows), `block` rows at a time; weight: dense fp32 W0.

    `trained`: the weight the run trained against, for an update that reads W0 (SMoA) when the
    base merged onto is another one (a quantized run merged onto its original weights).
    """
    out = torch.empty(rows.numel(), weight.shape[1], dtype=torch.float32)
    delta = update_rows(adapter, weight if trained is None else trained)
    for start in range(0, rows.numel(), block):
        ids = rows[start : start + block]
        out[start : start + ids.numel()] = (weight[ids].double() + delta(ids)).float()
    return out


def gather_rows(part: torch.Tensor, m: int) -> torch.Tensor | None:
    """Every rank's row block (see my_rows) concatenated on rank 0; None on the other ranks."""
    world = world_size()
    if world == 1:
        return part
    size, n = -(-m // world), part.shape[1]
    device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(size, n, dtype=part.dtype, device=device)
    padded[: part.shape[0]] = part
    bucket = [torch.empty_like(padded) for _ in range(world)] if rank() == 0 else None
    torch_dist.gather(padded, bucket, dst=0)
    return torch.cat(bucket, dim=0)[:m].cpu() if bucket is not None else None


class ShardWriter:
    """Accumulates tensors into shards of at most `max_bytes` and writes save_pretrained's layout."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.current:
            return
        save_file(self.current, str(self._part(len(self.files))), metadata={"format": "pt"})
        self.files.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def _part(self, i: int) -> Path:
        return self.folder / f".part-{i:05d}.safetensors"

    def close(self) -> int:
        """Write the last shard, name the shards (model-0000i-of-0000n), write the index; returns the shard count."""
        self.flush()
        count = len(self.files)
        if count == 1:
            os.replace(self._part(0), self.folder / SINGLE_NAME)
            return 1
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._part(i), self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return count


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def write_merged(
    source: Source,
    adapters: dict[str, Adapter],
    folder: Path | None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    trained: Source | None = None,
) -> dict[str, Any]:
    """Stream base + update into `folder` (rank 0's; None on other ranks). Collective across ranks.

    dtype None keeps each tensor's stored dtype (dequantized weights stay fp32). `trained`: where
    an update that reads W0 finds the weights the run trained against, when `source` is another
    base (read only for those adapters).
    """
    names = source.names()
    weight_of = {f"{layer}.weight": layer for layer in adapters}
    missing = sorted(set(weight_of) - set(names))
    if missing:
        raise ExportError(f"adapted layer weights not found in the base checkpoint: {missing[:3]} ({len(missing)} in all)")
    me, world = rank(), world_size()
    writer = ShardWriter(folder, max_shard_bytes) if me == 0 and folder is not None else None
    norms: dict[str, float] = {}
    for name in names:
        layer = weight_of.get(name)
        if layer is None:
            tensor = source.read(name, wanted=writer is not None)
            if writer is not None:
                writer.add(name, _cast(tensor, dtype))
            continue
        raw = source.read(name, wanted=True)
        stored, weight = raw.dtype, raw.float()
        reads = trained is not None and adapters[layer].update_reads_weight
        seen = trained.read(name, wanted=True).float() if reads else None
        part = merged_rows(adapters[layer], weight, my_rows(weight.shape[0], me, world), trained=seen)
        merged = gather_rows(part, weight.shape[0])
        if writer is not None:
            norms[layer] = float((merged - weight).norm() / weight.norm().clamp_min(1e-30))
            writer.add(name, merged.to(dtype or stored))
        del raw, weight, part, merged
    shards = writer.close() if writer is not None else 0
    return {"shards": shards, "bytes": writer.total_bytes if writer else 0, "relative_update": norms}

