"""The torch.distributed calls megaspec makes, each trivial when torch.distributed is not initialised."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without torch.distributed)."""
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order.

    With NCCL, torch pickles through torch.cuda.current_device(): the caller must have set each
    rank's device (torch.cuda.set_device(local_rank)) or every rank will use GPU 0.
    """
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0, in rank order (None elsewhere): data travels once, not to every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    torch_dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_to(tensor: torch.Tensor, owner: int) -> None:
    """Sum `tensor` over ranks into the owner's copy in place (the others keep an undefined value)."""
    if world_size() > 1:
        torch_dist.reduce(tensor, dst=owner, op=torch_dist.ReduceOp.SUM)


def barrier() -> None:
    """Wait for every rank (a no-op on one rank)."""
    if world_size() > 1:
        torch_dist.barrier()


def device() -> torch.device:
    """The device collectives run on: this rank's GPU under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each of `values` summed over every rank (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if world_size() > 1:
        torch_dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(value: float) -> float:
    """`value` averaged over every rank."""
    if world_size() == 1:
        return value
    return sum_over_ranks([value])[0] / world_size()


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
