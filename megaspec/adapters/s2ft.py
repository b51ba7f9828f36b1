"""S2FT: fine-tuning in a sparse spectrum of a permuted update (Zhang et al., CVPR 2026; docs/methods.md §4).

dW = P_r,c(scale * Re(IFFT2(S))): FourierFT's kernel in a row/column-permuted ("latent") domain,
dW[row_perm[i], col_perm[j]] = dWbar[i, j], with n real coefficients S at planned positions.

No code is public. What the paper says (through a third-party note) and what is inferred here:

- Plan from data, in two phases (megaspec.calibrate). `apply_adapters` gives a provisional plan
  (identity permutations, n seeded uniformly random placeholder positions, so a provisional
  adapter costs what a planned one does, and `calibrated` False) and the coefficient parameter of
  its final size n, zero, so delta == 0. After `deepspeed.initialize` (at once on a plain model) `calibrate_adapters` accumulates the coarse estimate
  dWhat = -sum_batches dL/dW0 per layer [note] (the number of batches, `s2ft_estimate_steps`
  optimizer steps' worth, is [unknown] in the paper), and the layer's planning rank calls
  `plan_from_estimate`; `set_plan` then overwrites the buffers in place. The coefficient
  Parameter is never re-created: the DeepSpeed optimizer already holds it.
- Permutations [note]: greedy nearest neighbour over the rows of dWhat (Euclidean distance),
  starting at a seeded random row (layer_generator(seed, name)), then the same over its columns
  (column distances do not depend on the row order). Distances by the Gram trick in fp64 blocks,
  stored as an fp32 K x K matrix [inferred]: peak memory on the planning rank is one fp64 copy
  of the layer plus K^2 fp32 (3.3 GB for K = 28672), O(K^2 D) flops, then K argmin steps with no
  host sync. Exact ties go to the lowest index.
- Positions [note]: n draws without replacement [inferred] from p(u, v) ~ |FFT2(dWbar_est)|^gamma,
  gamma = s2ft_gamma (1.5), dWbar_est = dWhat[row_perm][:, col_perm]. Under Re(IFFT2) with real
  coefficients (u, v) and (-u, -v) are the same basis [verified], so only one half-plane is
  sampled [inferred]: the rfft2 columns v in [0, N/2], and on the self-twinned columns v = 0 and
  v = N/2 only u <= M/2 (so (M N + #self-conjugate) / 2 positions are available). Positions of
  exactly zero power get 1e-12 of the largest weight, so n distinct positions always exist.
  Up to 2^24 candidates (torch.multinomial's limit) the draw is torch.multinomial on fp64 weights
  with the layer's CPU generator; above it (a 28672 x 8192 layer has 117M) the same algorithm
  torch.multinomial runs internally, the exponential race (keys E_i / w_i, E_i ~ Exp(1); the n
  smallest keys are an exact weighted draw without replacement), streamed in chunks of 2^22 with
  a running top-n, so memory is O(chunk + n) on the CPU.
- Training [inferred, FourierFT-style]: n real coefficients, zero init (init="gaussian" is
  refused: the estimate is taken at the frozen weights and the plan moves the positions), scale
  sqrt(M N) by default (ortho_scale) or config.scale. Fast forward: x~ = x[..., col_perm], the
  FourierFT sparse-spectrum path (docs/methods.md §1.3) on x~, then y = y~[..., inv_row_perm].
  Rows of dW for merge/export: latent rows inv_row_perm[a] by the FourierFT row formula
  (docs/methods.md §1.4), columns placed through inv_col_perm.
- Buffers (saved, never recomputed on load): rows, cols, row_perm, inv_row_perm, col_perm,
  inv_col_perm (long) and calibrated (bool, False for the provisional plan). apply_adapters
  refuses s2ft without calibration batches unless told that the caller calibrates later (the
  training loop does, or restores the plan of the checkpoint it resumes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from megaspec.adapters.base import Plan, layer_generator
from megaspec.adapters.sparse_spectrum import SparseSpectrumAdapter, positions_plan, sample_positions
from megaspec.config import AdapterConfig
from megaspec.spectral import sparse_spectrum_linear, sparse_spectrum_rows
from megaspec.spectral.transforms import compute_dtype

MULTINOMIAL_MAX = 2**24  # torch.multinomial refuses more categories
RACE_CHUNK = 2**22
ZERO_POWER_FLOOR = 1e-12  # weight of a zero-power position, relative to the largest weight
PLAN_KEYS = ("rows", "cols", "row_perm", "inv_row_perm", "col_perm", "inv_col_perm", "calibrated")


def half_plane_size(m: int, n: int) -> int:
    """Distinct Re(IFFT2) bases of an M x N spectrum: (M N + #self-conjugate positions) / 2."""
    self_conjugate = (2 if m % 2 == 0 else 1) * (2 if n % 2 == 0 else 1)
    return (m * n + self_conjugate) // 2


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[i]] = i."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def pairwise_sq_distances(points: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """K x K squared Euclidean distances between the rows of `points` (fp64 Gram blocks, fp32 result)."""
    p = points.double()
    sq = p.square().sum(1)
    out = torch.empty(p.shape[0], p.shape[0], dtype=torch.float32, device=p.device)
    for start in range(0, p.shape[0], block):
        gram = p[start : start + block] @ p.T
        out[start : start + block] = (sq[start : start + block, None] + sq[None, :] - 2.0 * gram).clamp_min_(0.0)
    return out


def nearest_neighbour_order(points: torch.Tensor, start: int) -> torch.Tensor:
    """Greedy open-path TSP over the rows of `points` (docs/methods.md §4 step 2): from `start`, always the
    nearest unvisited row; ties to the lowest index. Returns the visiting order (a permutation)."""
    dist = pairwise_sq_distances(points)
    k = dist.shape[0]
    order = torch.empty(k, dtype=torch.long, device=dist.device)
    current = torch.tensor([start], dtype=torch.long, device=dist.device)
    order[:1] = current
    dist.index_fill_(1, current, math.inf)
    for i in range(1, k):
        current = dist.index_select(0, current).argmin(dim=1)
        dist.index_fill_(1, current, math.inf)
        order[i : i + 1] = current
    return order


def sample_without_replacement(
    weights: Callable[[int, int], torch.Tensor], total: int, count: int, generator: torch.Generator, chunk: int | None = None
) -> torch.Tensor:
    """`count` distinct indices of [0, total) drawn with probability ~ weights, without replacement.

    `weights(start, stop)` gives the fp64 CPU weights of [start, stop). Up to MULTINOMIAL_MAX
    candidates (and chunk None): torch.multinomial. Otherwise the exponential race in chunks.
    """
    if chunk is None and total <= MULTINOMIAL_MAX:
        return torch.multinomial(weights(0, total), count, replacement=False, generator=generator)
    chunk = chunk or RACE_CHUNK
    best_keys = torch.empty(0, dtype=torch.float64)
    best = torch.empty(0, dtype=torch.long)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        w = weights(start, stop)
        keys = torch.cat([best_keys, torch.empty_like(w).exponential_(generator=generator) / w])
        index = torch.cat([best, torch.arange(start, stop)])
        best_keys, picked = torch.topk(keys, min(count, keys.numel()), largest=False, sorted=True)
        best = index[picked]
    return best


def power_prior_positions(
    latent: torch.Tensor, count: int, gamma: float, generator: torch.Generator, chunk: int | None = None
) -> torch.Tensor:
    """Flat positions u * N + v drawn from one half-plane with p ~ |FFT2(latent)|^gamma (docs/methods.md §4 step 3)."""
    m, n = latent.shape
    h = n // 2 + 1
    amp = torch.fft.rfft2(latent.to(compute_dtype(latent))).abs().flatten()
    top = float(amp.max())
    if not top > 0:
        raise ValueError("the update estimate is zero: its spectrum gives no sampling prior")
    floor = ZERO_POWER_FLOOR * top**gamma

    def weights(start: int, stop: int) -> torch.Tensor:
        idx = torch.arange(start, stop)
        u, v = idx // h, idx % h
        twin = ((v == 0) | (2 * v == n)) & (u > m // 2)  # (M - u, v) is the kept representative
        return (amp[start:stop].double().cpu().pow(gamma) + floor).masked_fill_(twin, 0.0)

    picked = sample_without_replacement(weights, m * h, count, generator, chunk)
    return (picked // h) * n + picked % h


class S2FTAdapter(SparseSpectrumAdapter):
    method = "s2ft"
    kernel = "fourier"
    # planned from a gradient estimate over data by megaspec.calibrate, after apply_adapters
    needs_calibration = True
    capacity_note = ": one half-plane of the spectrum"

    @classmethod
    def coeff_capacity(cls, shape: tuple[int, int]) -> int:
        """One half-plane: (u, v) and (-u, -v) are the same basis under Re(IFFT2) with real coefficients."""
        return half_plane_size(*shape)

    @classmethod
    def check_config(cls, config: AdapterConfig, shape: tuple[int, int], name: str) -> None:
        super().check_config(config, shape, name)
        if not config.s2ft_gamma > 0:
            raise ValueError(f"s2ft_gamma={config.s2ft_gamma} must be positive")
        if config.s2ft_estimate_steps < 1:
            raise ValueError(f"s2ft_estimate_steps={config.s2ft_estimate_steps} must be at least 1")
        if config.init != "zeros":
            raise ValueError(f"init={config.init!r}: s2ft starts from zero coefficients (its estimate is taken at W0)")

    # --- plan -----------------------------------------------------------------------------
    def local_plan(self, result: Any) -> Plan:
        """The provisional plan: identity permutations, random placeholder positions, not calibrated."""
        (m, n), count = self.shape, self.config.n_coeffs
        flat = sample_positions(m * n, count, torch.zeros(0, dtype=torch.long), layer_generator(self.config.seed, self.name))
        rows, cols = torch.arange(m), torch.arange(n)
        return {**positions_plan(flat, n), "row_perm": rows, "inv_row_perm": rows.clone(),
                "col_perm": cols, "inv_col_perm": cols.clone(), "calibrated": torch.tensor(False)}

    def nominal_plan(self) -> Plan:
        (m, n), meta = self.shape, {"dtype": torch.long, "device": "meta"}
        return {**super().nominal_plan(), "row_perm": torch.empty(m, **meta), "inv_row_perm": torch.empty(m, **meta),
                "col_perm": torch.empty(n, **meta), "inv_col_perm": torch.empty(n, **meta),
                "calibrated": torch.empty((), dtype=torch.bool, device="meta")}

    def plan_from_estimate(self, estimate: torch.Tensor) -> Plan:
        """The plan from this layer's coarse update estimate dWhat (M x N, summed over all ranks)."""
        m, n = self.shape
        if tuple(estimate.shape) != (m, n):
            raise ValueError(f"layer {self.name}: estimate of shape {tuple(estimate.shape)}, expected {(m, n)}")
        generator = layer_generator(self.config.seed, self.name)
        start_row = int(torch.randint(m, (1,), generator=generator))
        start_col = int(torch.randint(n, (1,), generator=generator))
        est = estimate.to(compute_dtype(estimate))
        row_perm = nearest_neighbour_order(est, start_row)
        col_perm = nearest_neighbour_order(est.T, start_col)
        latent = est.index_select(0, row_perm).index_select(1, col_perm)  # dWbar_est
        flat = power_prior_positions(latent, self.config.n_coeffs, self.config.s2ft_gamma, generator)
        row_perm, col_perm = row_perm.cpu(), col_perm.cpu()
        return {**positions_plan(flat, n), "row_perm": row_perm, "inv_row_perm": inverse_permutation(row_perm),
                "col_perm": col_perm, "inv_col_perm": inverse_permutation(col_perm), "calibrated": torch.tensor(True)}

    @torch.no_grad()
    def set_plan(self, plan: Plan) -> None:
        """Overwrite the plan buffers in place (same shapes); the parameters are left untouched."""
        if sorted(plan) != sorted(PLAN_KEYS):
            raise ValueError(f"layer {self.name}: an s2ft plan has keys {sorted(PLAN_KEYS)}, got {sorted(plan)}")
        for key in PLAN_KEYS:
            buf, value = getattr(self, key), plan[key]
            if value.shape != buf.shape or value.dtype != buf.dtype:
                raise ValueError(f"layer {self.name}: {key} is {value.dtype}{tuple(value.shape)}, expected {buf.dtype}{tuple(buf.shape)}")
            buf.copy_(value)

    # --- compute --------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        coeffs = self.coeffs * self.scale
        latent = sparse_spectrum_linear(x.index_select(-1, self.col_perm), coeffs, self.rows, self.cols, self.out_features, self.kernel,
                                        index=self.spectrum_index(compute_dtype(x)))
        return latent.index_select(-1, self.inv_row_perm)

    def delta_weight(self, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        coeffs = self.coeffs.detach().to(torch.promote_types(self.coeffs.dtype, torch.float32)) * self.scale
        device = self.inv_row_perm.device
        rows = torch.arange(self.out_features, device=device) if row_ids is None else row_ids.to(device)
        latent = sparse_spectrum_rows(coeffs, self.rows, self.cols, self.shape, self.inv_row_perm[rows], self.kernel)
        return latent.index_select(-1, self.inv_col_perm)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent spectrum's factors, rows and columns placed: dW[r, c] = latent[inv_row_perm[r], inv_col_perm[c]]."""
        b, a = super().low_rank_factors()
        return b[self.inv_row_perm.cpu()], a[:, self.inv_col_perm.cpu()]

    def float64_rows(self) -> None:
        """None: the permuted rows go through a float64 copy of the adapter."""
        return None
