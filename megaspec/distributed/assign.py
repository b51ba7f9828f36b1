"""Spread layers over ranks so that every rank plans about the same number of weight elements."""

from __future__ import annotations

import heapq


def assign_layers(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each layer: largest first, each to the least-loaded rank (ties: lower rank).

    Equal sizes keep their layer order (a stable sort), so the result is a pure function of
    (sizes, world_size) and every rank computes the same assignment.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    owners = [0] * len(sizes)
    loads = [(0, rank) for rank in range(world_size)]
    for layer in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, rank = heapq.heappop(loads)
        owners[layer] = rank
        heapq.heappush(loads, (load + sizes[layer], rank))
    return owners
