"""Plan every adapter collectively: one layer gathered at a time, layers spread over ranks, one agreed plan.

docs/design.md "Collective steps under ZeRO-3". Every rank runs the same sequence of collectives:
one gather per partitioned layer (in layer order), each adapter class's `select_results` (SSH's
global selection agrees there on what to send), one all-gather of the per-layer results, one
all-gather of the plan digests. World size 1 (or torch.distributed not initialised) takes the
same path with trivial collectives, so it picks the same positions as a multi-rank run.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from megaspec.adapters import Adapter, dense_weight
from megaspec.adapters.base import Plan
from megaspec.distributed.assign import assign_layers
from megaspec.distributed.comm import all_gather_object, rank, to_cpu, world_size
from megaspec.distributed.gather import gather_layer, gathered_numel, is_partitioned


def plan_adapters(adapters: dict[str, Adapter]) -> dict[str, Any]:
    """Plan, combine (per adapter class), verify that all ranks agree, then apply the plans."""
    names = list(adapters)
    _check_same_layers(adapters)
    results, planned_by, peak, gathered = _plan_layers(adapters)
    plans: dict[str, Plan] = {}
    for group in _by_class(adapters).values():
        plans.update(type(next(iter(group.values()))).combine(group, {n: results[n] for n in group}))
    layer_digests = [plan_digest(name, plans[name]) for name in names]
    digest = hashlib.sha256("".join(layer_digests).encode()).hexdigest()
    _check_agreement(names, layer_digests, digest)
    for name in names:
        adapters[name].apply_plan(plans[name])
    return {"layers": len(names), "digest": digest, "planned_by": planned_by, "peak_gathered_numel": peak,
            "results_bytes": gathered}


def _plan_layers(adapters: dict[str, Adapter]) -> tuple[dict[str, Any], dict[str, int | None], int, int]:
    """Every layer's plan_layer result on every rank, computed once by its assigned rank.

    Also returns the tensor bytes of all ranks' results together (what the all-gather delivers).
    """
    me = rank()
    weighted = [name for name, adapter in adapters.items() if adapter.needs_weight]
    sizes = [math.prod(adapters[n].shape) for n in weighted]
    owners = dict(zip(weighted, assign_layers(sizes, world_size()), strict=True))
    bases = [adapters[n].base for n in weighted]
    groups = _by_class(adapters)
    local: dict[str, Any] = {}
    peak = 0
    for name in weighted:
        base = adapters[name].base
        # Gathering is a collective under ZeRO-3: every rank enters it for every layer, in order,
        # and the ranks that do not own the layer release it at once. Unpartitioned layers (plain
        # or bitsandbytes) are whole on every rank, so only the owner touches them.
        if owners[name] != me and not is_partitioned(base):
            continue
        with gather_layer(base):
            peak = max(peak, gathered_numel(bases))
            if owners[name] == me:
                local[name] = to_cpu(adapters[name].plan_layer(dense_weight(base)))
                group = groups[type(adapters[name])]
                local.update(type(adapters[name]).shrink_results(group, _mine(local, group)))
    for cls, group in groups.items():  # collective: the same classes, in the same order, on every rank
        local.update(cls.select_results(group, _mine(local, group), all_gather_object))
    results: dict[str, Any] = {}
    for part in all_gather_object(local):
        results.update(part)
    gathered = sum(_tensor_bytes(result) for result in results.values())
    for name, adapter in adapters.items():
        if not adapter.needs_weight:
            results[name] = adapter.plan_layer(None)
    planned_by: dict[str, int | None] = {name: owners.get(name) for name in adapters}
    return results, planned_by, peak, gathered


def _mine(local: dict[str, Any], group: dict[str, Adapter]) -> dict[str, Any]:
    """This rank's results of the layers in `group`."""
    return {name: local[name] for name in group if name in local}


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) result."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def _by_class(adapters: dict[str, Adapter]) -> dict[type, dict[str, Adapter]]:
    """Adapters grouped by class, each group in layer order (combine sees one method at a time)."""
    groups: dict[type, dict[str, Adapter]] = {}
    for name, adapter in adapters.items():
        groups.setdefault(type(adapter), {})[name] = adapter
    return groups


def plan_digest(name: str, plan: Plan) -> str:
    """sha256 (hex) of one layer's plan: its name, then each buffer's key, dtype, shape and bytes."""
    h = hashlib.sha256(name.encode())
    for key in sorted(plan):
        tensor = plan[key].detach().cpu().contiguous()
        h.update(f"|{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_same_layers(adapters: dict[str, Adapter]) -> None:
    """Fail before the first gather, rather than hang in it, when ranks hold different layers."""
    layers = [
        (n, type(a).__name__, a.shape, a.needs_weight, is_partitioned(a.base)) for n, a in adapters.items()
    ]
    mine = hashlib.sha256(repr(layers).encode()).hexdigest()
    everyone = all_gather_object(mine)
    if any(other != mine for other in everyone):
        differ = [r for r, other in enumerate(everyone) if other != everyone[0]]
        raise RuntimeError(
            f"ranks disagree on the adapted layers (names, methods, shapes): ranks {differ} differ from rank 0"
        )


def _check_agreement(names: list[str], layer_digests: list[str], digest: str) -> None:
    """Fail loudly, on every rank, when the ranks do not all hold the same plan."""
    everyone = all_gather_object((digest, layer_digests))
    if all(other == digest for other, _ in everyone):
        return
    lines = []
    for r, (other, others_layers) in enumerate(everyone):
        if other != digest:
            differ = [n for n, a, b in zip(names, layer_digests, others_layers, strict=False) if a != b]
            lines.append(f"rank {r} differs from rank {rank()} on {len(differ)} layer(s), first {differ[:3]}")
    raise RuntimeError(f"ranks disagree on the adapter plan: {'; '.join(lines)}")
