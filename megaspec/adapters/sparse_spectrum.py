"""Shared machinery of the sparse-spectrum methods (SSH, FourierFT): positions, coefficients, fast forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from megaspec.adapters.base import Adapter, Plan, layer_generator, ortho_scale
from megaspec.config import AdapterConfig
from megaspec.spectral import sparse_spectrum_linear, sparse_spectrum_rows
from megaspec.spectral.sparse import SpectrumIndex, spectrum_factors, spectrum_index
from megaspec.spectral.transforms import compute_dtype


def sample_positions(total: int, count: int, exclude: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct flat positions in [0, total) not in `exclude`, uniformly at random (seeded).

    Small or dense draws use one randperm; large sparse draws (a 28672 x 8192 layer has 235M
    positions) use order-preserving rejection sampling so memory stays O(count).
    """
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    available = total - exclude.numel()
    if count > available:
        raise ValueError(f"cannot draw {count} positions: only {available} of {total} are free")
    excluded = exclude.numpy()
    if total <= (1 << 22) or count > available // 4:
        perm = torch.randperm(total, generator=generator).numpy()
        return torch.from_numpy(perm[~np.isin(perm, excluded)][:count].copy())
    picked = np.zeros(0, dtype=np.int64)
    while picked.size < count:
        draw = torch.randint(0, total, (2 * (count - picked.size) + 16,), generator=generator).numpy()
        merged = np.concatenate([picked, draw[~np.isin(draw, excluded)]])
        _, first = np.unique(merged, return_index=True)
        picked = merged[np.sort(first)]
    return torch.from_numpy(picked[:count].copy())


def positions_plan(flat: torch.Tensor, n_in: int, from_energy: torch.Tensor | None = None) -> Plan:
    """A plan from flat positions f = u * N + v (peft's convention), sorted by position."""
    order = torch.argsort(flat)
    flat = flat[order]
    plan = {"rows": flat // n_in, "cols": flat % n_in}
    if from_energy is not None:
        plan["from_energy"] = from_energy[order]
    return plan


class SparseSpectrumAdapter(Adapter):
    """n real coefficients at planned (row, col) frequencies; dW = scale * kernel-transform(S)."""

    kernel: str = "dht"
    trains_coefficients = True
    default_lr = 2e-2  # coefficients move unit-norm patterns of the weight (ortho_scale): a large step suits them
    # appended to the n_coeffs range error, where the range has a reason
    capacity_note: ClassVar[str] = ""

    @classmethod
    def check_config(cls, config: AdapterConfig, shape: tuple[int, int], name: str) -> None:
        (m, n), room = shape, cls.coeff_capacity(shape)
        if not 0 < config.n_coeffs <= room:
            raise ValueError(f"n_coeffs={config.n_coeffs} must be in 1..{room} for {cls.method} on layer {name} ({m}x{n})"
                             + cls.capacity_note)

    def default_scale(self) -> float:
        return ortho_scale(self.shape)

    def nominal_plan(self) -> Plan:
        n = self.config.n_coeffs
        return {"rows": torch.empty(n, dtype=torch.long, device="meta"), "cols": torch.empty(n, dtype=torch.long, device="meta")}

    def init_parameters(self) -> None:
        n = self.rows.numel()
        if self.config.init == "gaussian":  # parity with SSH/FourierFT code: c ~ N(0, 1)
            make = lambda: torch.randn(n, generator=layer_generator(self.config.seed + 1, self.name))  # noqa: E731
        elif self.config.init == "zeros":
            make = lambda: torch.zeros(n)  # noqa: E731
        else:
            raise ValueError(f"unknown init {self.config.init!r} for {self.method}; use 'zeros' or 'gaussian'")
        self.coeffs = self.new_parameter(make, (n,))
        self.scale = self.resolved_scale()

    def spectrum_index(self, dtype: torch.dtype) -> SpectrumIndex:
        """The fast path's index tensors for this plan, rebuilt only when rows/cols change (new plan, load, move)."""
        key = (self.rows, self.cols, self.rows._version, self.cols._version, self.rows.data_ptr(), self.cols.data_ptr(), dtype)
        cached = self.__dict__.get("_spectrum_index")  # a plain attribute: not a buffer, never saved or moved
        if cached is None or any(a is not b if isinstance(a, torch.Tensor) else a != b for a, b in zip(cached[0], key, strict=True)):
            cached = (key, spectrum_index(self.rows, self.cols, self.shape, self.kernel, dtype))
            self.__dict__["_spectrum_index"] = cached
        return cached[1]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        coeffs = self.coeffs * self.scale
        return sparse_spectrum_linear(x, coeffs, self.rows, self.cols, self.out_features, self.kernel,
                                      index=self.spectrum_index(compute_dtype(x)))

    def delta_weight(self, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        coeffs = self.coeffs.detach().float() * self.scale
        return sparse_spectrum_rows(coeffs, self.rows, self.cols, self.shape, row_ids, self.kernel)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        coeffs = self.coeffs.detach().double().cpu() * self.scale
        return spectrum_factors(coeffs, self.rows, self.cols, self.shape, self.kernel)

    def float64_rows(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Float64 coefficients through sparse_spectrum_rows: delta_weight's fp32 path forms the angles
        2 pi a u / M without reducing a u mod M (relative error 5e-4 at M = 4096, 4e-3 at 28672)."""
        coeffs = self.coeffs.detach().double().cpu() * self.scale
        rows, cols = self.rows.cpu(), self.cols.cpu()
        return lambda ids: sparse_spectrum_rows(coeffs, rows, cols, self.shape, ids.cpu(), self.kernel)
