"""SSH: sparse spectrum adaptation via the discrete Hartley transform (Shen et al., NAACL 2025).

dW = scale * IDHT2(S) with n trainable coefficients at planned positions (METHODS.md 2).
Positions: a fraction `energy_ratio` by DHT energy of W0, the rest uniformly at random (seeded).

Choices (METHODS.md 2.2-2.4, all recorded here because the paper body was not reachable):
- kernel: the true non-separable 2-D DHT by default; `separable=True` for the released code's
  rows-then-columns transform.
- energy: ortho-normalised H^2 / (M N), so by Parseval a layer's energies sum to ||W0||_F^2 and
  scores compare across layer shapes.
- selection="global" (default, the abstract's "across all layers"): the total budget is
  n_coeffs * layers. Each layer first keeps its top `min_per_layer` energy positions (no layer
  starves); the rest of the energy budget floor(energy_ratio * total) goes to the globally
  highest scores (ties by layer order, then position); the random budget is split over layers in
  proportion to M*N (largest remainder), then drawn per layer without replacement.
  selection="per_layer": every layer gets exactly n_coeffs (the released code's rule).
- init: zeros (delta == 0 at step 0; the gradient at 0 is non-zero because dW is linear in c);
  init="gaussian" gives the code's N(0, 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from megaspec.adapters.base import Adapter, Plan, layer_generator
from megaspec.adapters.sparse_spectrum import SparseSpectrumAdapter, positions_plan, sample_positions
from megaspec.spectral import dht2_energy_topk


class SSHAdapter(SparseSpectrumAdapter):
    method = "ssh"
    needs_weight = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel = "dht_separable" if self.config.separable else "dht"
        cfg, (m, n) = self.config, self.shape
        if cfg.selection not in ("global", "per_layer"):
            raise ValueError(f"selection={cfg.selection!r}; use 'global' or 'per_layer'")
        if not 0.0 <= cfg.energy_ratio <= 1.0:
            raise ValueError(f"energy_ratio={cfg.energy_ratio} must be within [0, 1]")
        if not 0 < cfg.n_coeffs <= m * n:
            raise ValueError(f"n_coeffs={cfg.n_coeffs} must be in 1..{m * n} for layer {self.name} ({m}x{n})")

    def energy_budget(self) -> int:
        """Energy-chosen positions in this layer's selection pool (all layers' in global mode)."""
        layers = self.n_layers if self.config.selection == "global" else 1
        return math.floor(self.config.energy_ratio * self.config.n_coeffs * layers)

    def plan_layer(self, weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """This layer's best energy candidates: no layer can take more than the whole energy budget."""
        scores, positions = dht2_energy_topk(weight, self.energy_budget(), separable=self.config.separable)
        return {"scores": scores.float(), "positions": positions}

    @classmethod
    def combine(cls, adapters: dict[str, Adapter], results: dict[str, Any]) -> dict[str, Plan]:
        names = list(adapters)
        cfg = adapters[names[0]].config
        if cfg.selection == "per_layer":
            energy = {name: results[name]["positions"] for name in names}
            counts = {name: cfg.n_coeffs for name in names}
        else:
            energy = _global_energy_positions(adapters, results)
            counts = _global_counts(adapters, energy)
        plans = {}
        for name in names:
            adapter = adapters[name]
            m, n = adapter.shape
            chosen = energy[name]
            rand = sample_positions(m * n, counts[name] - chosen.numel(), chosen, layer_generator(cfg.seed, name))
            flags = torch.cat([torch.ones(chosen.numel(), dtype=torch.bool), torch.zeros(rand.numel(), dtype=torch.bool)])
            plans[name] = positions_plan(torch.cat([chosen, rand]), n, flags)
        return plans


def _global_energy_positions(adapters: dict[str, Adapter], results: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-layer floor, then the global top scores across layers (METHODS.md 2.4)."""
    names = list(adapters)
    cfg = adapters[names[0]].config
    budget = adapters[names[0]].energy_budget()
    floor = min(cfg.min_per_layer, budget // len(names))
    chosen = {name: results[name]["positions"][:floor] for name in names}
    pool_scores, pool_layer, pool_pos = [], [], []
    for i, name in enumerate(names):
        scores, positions = results[name]["scores"][floor:], results[name]["positions"][floor:]
        pool_scores.append(scores.numpy())
        pool_layer.append(np.full(scores.numel(), i, dtype=np.int64))
        pool_pos.append(positions.numpy())
    scores, layer, pos = (np.concatenate(a) for a in (pool_scores, pool_layer, pool_pos))
    take = max(budget - floor * len(names), 0)
    order = np.lexsort((pos, layer, -scores.astype(np.float64)))[:take]  # score desc, then layer, position
    for i, name in enumerate(names):
        extra = torch.from_numpy(pos[order][layer[order] == i].copy())
        chosen[name] = torch.cat([chosen[name], extra])
    return chosen


def _global_counts(adapters: dict[str, Adapter], energy: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per-layer totals: energy picks plus the random budget split in proportion to M*N."""
    names = list(adapters)
    cfg = adapters[names[0]].config
    sizes = np.array([math.prod(adapters[name].shape) for name in names], dtype=np.float64)
    room = np.array([sizes[i] - energy[name].numel() for i, name in enumerate(names)], dtype=np.int64)
    random_total = cfg.n_coeffs * len(names) - sum(e.numel() for e in energy.values())
    if random_total > room.sum():
        raise ValueError(f"n_coeffs={cfg.n_coeffs} x {len(names)} layers exceeds the adapted layers' size")
    share = random_total * sizes / sizes.sum()
    alloc = np.minimum(np.floor(share).astype(np.int64), room)
    # largest remainder (ties by layer order), then any overflow to layers with room left
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if alloc.sum() >= random_total:
            break
        if alloc[i] < room[i]:
            alloc[i] += 1
    for i in range(len(names)):
        extra = min(random_total - alloc.sum(), room[i] - alloc[i])
        alloc[i] += max(extra, 0)
    return {name: int(energy[name].numel() + alloc[i]) for i, name in enumerate(names)}
