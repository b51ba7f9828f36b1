"""SSH: sparse spectrum adaptation via the discrete Hartley transform (Shen et al., NAACL 2025).

dW = scale * IDHT2(S) with n trainable coefficients at planned positions (docs/methods.md §2).
Positions: a fraction `energy_ratio` by DHT energy of W0, the rest uniformly at random (seeded).

Choices (docs/methods.md §2.2-2.4, all recorded here because the paper body was not reachable):
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
  Planned over ranks, the global top scores are found in two stages, so that no rank ever holds
  or receives every layer's candidates (L x budget, 1.3 GiB for all projections of 70B): each
  rank keeps only its own top candidates while it plans (`shrink_results`), then the ranks agree
  on the score of the last pick by bisection over counts and send only what will be picked
  (`select_results`). Both are exact: combine gives the same plan as on every candidate.
- init: zeros (delta == 0 at step 0; the gradient at 0 is non-zero because dW is linear in c);
  init="gaussian" gives the code's N(0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from megaspec.adapters.base import Adapter, Plan, layer_generator
from megaspec.adapters.sparse_spectrum import SparseSpectrumAdapter, positions_plan, sample_positions
from megaspec.config import AdapterConfig
from megaspec.spectral import dht2_energy_topk


class SSHAdapter(SparseSpectrumAdapter):
    method = "ssh"
    needs_weight = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel = "dht_separable" if self.config.separable else "dht"

    @classmethod
    def check_config(cls, config: AdapterConfig, shape: tuple[int, int], name: str) -> None:
        if config.selection not in ("global", "per_layer"):
            raise ValueError(f"selection={config.selection!r}; use 'global' or 'per_layer'")
        if not 0.0 <= config.energy_ratio <= 1.0:
            raise ValueError(f"energy_ratio={config.energy_ratio} must be within [0, 1]")
        super().check_config(config, shape, name)

    def energy_budget(self) -> int:
        """Energy-chosen positions in this layer's selection pool (all layers' in global mode)."""
        layers = self.n_layers if self.config.selection == "global" else 1
        return math.floor(self.config.energy_ratio * self.config.n_coeffs * layers)

    def plan_layer(self, weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """This layer's best energy candidates: no layer can take more than the whole energy budget."""
        scores, positions = dht2_energy_topk(weight, self.energy_budget(), separable=self.config.separable)
        # the selection compares fp32 scores: sort by those (a fp64 weight's distinct energies may tie)
        order = torch.argsort(positions, stable=True)
        scores, positions = scores.float()[order], positions[order]
        order = torch.argsort(scores, descending=True, stable=True)
        return {"scores": scores[order], "positions": positions[order]}

    @classmethod
    def shrink_results(cls, adapters: dict[str, Adapter], local: dict[str, Any]) -> dict[str, Any]:
        """Global mode: of this rank's pools keep the top `take`, the most the global ranking can use."""
        if not local or adapters[next(iter(adapters))].config.selection != "global":
            return local
        return _keep_top(adapters, local, lambda obj: [obj], bisect=False)

    @classmethod
    def select_results(
        cls, adapters: dict[str, Adapter], local: dict[str, Any], gather: Callable[[Any], list[Any]]
    ) -> dict[str, Any]:
        """Global mode: keep exactly the candidates the global ranking picks (collective)."""
        if adapters[next(iter(adapters))].config.selection != "global":
            return local
        return _keep_top(adapters, local, gather, bisect=True)

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


def _floor_and_take(adapters: dict[str, Adapter]) -> tuple[int, int]:
    """(floor, take): the top positions every layer keeps, and how many the global ranking adds."""
    first = adapters[next(iter(adapters))]
    budget = first.energy_budget()
    floor = min(first.config.min_per_layer, budget // len(adapters))
    return floor, max(budget - floor * len(adapters), 0)


def _global_energy_positions(adapters: dict[str, Adapter], results: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-layer floor, then the global top scores across layers (docs/methods.md §2.4)."""
    names = list(adapters)
    floor, take = _floor_and_take(adapters)
    chosen = {name: results[name]["positions"][:floor] for name in names}
    pool_scores, pool_layer, pool_pos = [], [], []
    for i, name in enumerate(names):
        scores, positions = results[name]["scores"][floor:], results[name]["positions"][floor:]
        pool_scores.append(scores.numpy())
        pool_layer.append(np.full(scores.numel(), i, dtype=np.int64))
        pool_pos.append(positions.numpy())
    scores, layer, pos = (np.concatenate(a) for a in (pool_scores, pool_layer, pool_pos))
    order = np.lexsort((pos, layer, -scores.astype(np.float64)))[:take]  # score desc, then layer, position
    for i, name in enumerate(names):
        extra = torch.from_numpy(pos[order][layer[order] == i].copy())
        chosen[name] = torch.cat([chosen[name], extra])
    return chosen


# --- the global top `take` without gathering every candidate ------------------------------------
#
# Each layer's pool (its results past the floor) is sorted the way combine ranks candidates within
# a layer (fp32 score descending, then position), so what combine picks from a layer is always a
# prefix of its pool. The top `take` of all pools under combine's order (score descending, then
# layer, then position) is: every score above the take-th largest score s*, then the ties at s* in
# layer order. Finding s* and the number of ties each layer gets is all the ranks must agree on.
# Energies are >= 0, so comparing fp32 bit patterns as integers compares the scores.

_ABOVE_EVERY_FINITE = 0x7F800001  # one above the bits of +inf


def _score_keys(scores: torch.Tensor, name: str) -> np.ndarray:
    """Negated fp32 bit patterns of a descending pool: ascending, so np.searchsorted counts."""
    values = scores.numpy().astype(np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    if not np.all(np.isfinite(values) & (values >= 0)):
        raise ValueError(f"layer {name}: DHT energies are negative or not finite; its weight holds NaN or inf")
    return -values.view(np.int32).astype(np.int64)


def _at_least(keys: np.ndarray, bits: int) -> int:
    """How many scores of a pool have fp32 bits >= `bits`."""
    return int(np.searchsorted(keys, -bits, side="right"))


def _kth_bits(pools: list[np.ndarray], take: int, gather: Callable[[Any], list[Any]], bisect: bool) -> int | None:
    """fp32 bits of the take-th largest score of all ranks' pools; None when they hold no more than `take`."""
    total = sum(gather(sum(len(k) for k in pools)))
    if total <= take:
        return None
    if not bisect:  # this rank alone: one partial sort
        keys = np.concatenate(pools)
        return -int(np.partition(keys, take - 1)[take - 1])
    low, high = 0, _ABOVE_EVERY_FINITE  # at least `take` scores >= low, fewer than `take` >= high
    while high - low > 1:  # 31 rounds of one integer per rank
        mid = (low + high) // 2
        if sum(gather(sum(_at_least(k, mid) for k in pools))) >= take:
            low = mid
        else:
            high = mid
    return low


def _keep_top(
    adapters: dict[str, Adapter], local: dict[str, Any], gather: Callable[[Any], list[Any]], bisect: bool
) -> dict[str, Any]:
    """`local` with each layer's results cut to its floor plus its share of the top `take` of all pools."""
    floor, take = _floor_and_take(adapters)
    index = {name: i for i, name in enumerate(adapters)}
    names = sorted(local, key=index.__getitem__)
    pools = [_score_keys(local[name]["scores"][floor:], name) for name in names]
    kth = _kth_bits(pools, take, gather, bisect)
    if kth is None:
        return local
    above = [_at_least(k, kth + 1) for k in pools]
    ties = {index[name]: _at_least(k, kth) - a for name, k, a in zip(names, pools, above, strict=True)}
    everyone = gather((sum(above), {i: t for i, t in ties.items() if t}))
    left = take - sum(count for count, _ in everyone)
    tie_share = {}
    for i, count in sorted(item for _, part in everyone for item in part.items()):  # ties in layer order
        tie_share[i], left = min(count, left), left - min(count, left)
    out = {}
    for name, a in zip(names, above, strict=True):
        keep = floor + a + tie_share.get(index[name], 0)
        out[name] = {key: value[:keep].clone() for key, value in local[name].items()}  # a view would pickle it all
    return out


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
