"""Materialise one layer's ZeRO-3 partitioned parameters at a time (a no-op for anything else)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn


def is_partitioned(module: nn.Module) -> bool:
    """Whether any parameter of `module` (recursively) is a ZeRO-3 partitioned parameter."""
    # DeepSpeed's own test (zero.partition_parameters.is_zero_param) is hasattr(p, "ds_id");
    # checking it here keeps plain and bitsandbytes runs free of the deepspeed import.
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=True))


@contextmanager
def gather_params(params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, the ZeRO-3 partitioned ones among `params` hold their full data (a no-op otherwise).

    Under ZeRO-3 this is deepspeed.zero.GatheredParameters, a collective: every rank of the
    parameters' process group must enter it for the same parameters in the same order.
    modifier_rank=None: the data is only read, so nothing is broadcast back on exit.
    """
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextmanager
def gather_layer(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `module`'s parameters (recursively) hold their full data; released on exit."""
    with gather_params(list(module.parameters(recurse=True))):
        yield module


def gathered_numel(modules: Iterable[nn.Module]) -> int:
    """Elements of ZeRO-3 parameters of `modules` that are materialised on this rank right now."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters(recurse=True):
            if hasattr(p, "ds_id") and id(p) not in seen and p.ds_status.name != "NOT_AVAILABLE":
                seen.add(id(p))
                total += int(p.ds_numel)
    return total
