"""The few torch.distributed calls planning needs, trivial when torch.distributed is not initialised."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order.

    With NCCL, torch pickles through torch.cuda.current_device(): the caller must have set each
    rank's device (torch.cuda.set_device(local_rank)) or every rank will use GPU 0.
    """
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor (in dicts, lists, tuples) moved to CPU, so it unpickles on any rank."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def prefer_cpu_accelerator() -> None:
    """Tell DeepSpeed to use its CPU accelerator when there is no CUDA GPU (megaspec runs on CUDA or CPU).

    Left to detect it, DeepSpeed warns "Setting accelerator to CPU ... unable to detect it" on the
    first import, a second line before every one-line error of the command-line tools. An explicit
    $DS_ACCELERATOR is kept.
    """
    import os

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
