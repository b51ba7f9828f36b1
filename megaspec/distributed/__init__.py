"""Collective steps under ZeRO-3: gather one layer at a time, spread layers over ranks, agree."""

from megaspec.distributed.assign import assign_layers
from megaspec.distributed.gather import gather_layer, gather_params, is_partitioned
from megaspec.distributed.plan import plan_adapters, plan_digest

__all__ = ["assign_layers", "gather_layer", "gather_params", "is_partitioned", "plan_adapters", "plan_digest"]
