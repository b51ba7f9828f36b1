"""Collective steps under ZeRO-3: gather one layer at a time, spread layers over ranks, agree."""

from megaspec.dist.plan import plan_adapters

__all__ = ["plan_adapters"]
