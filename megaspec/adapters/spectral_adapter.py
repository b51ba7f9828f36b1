"""Spectral Adapter (Zhang & Pilanci, NeurIPS 2024): tune the top-r singular vectors of W0 (docs/methods.md §6).

Plan (both variants, needs the dense weight): W0 = U S V^T by a float64 thin SVD; keep the top r
as buffers U1 (M x r), S1 (r), V1 (N x r), signs fixed so that the largest-|.| entry of every
column of U1 is positive (megaspec.spectral.lowrank.top_singular), stored in float32. Saved with
the adapter, so a reload never recomputes the SVD.

spectral_a (^A, additive; official llama3_tune peft fork, `spectral_top=True`):
    W' = (U1 + B) S1 (V1 + A^T)^T + W_rest,  i.e.  dW = U1 S1 A + B S1 V1^T + B S1 A,
    trainables A (r x N) and B (M x r), both zero at init as in the official code; r (M + N) per layer.
spectral_r (^R, rotation; official code only in the diffusion experiments, edlora.py):
    dW = U1 (Q_U diag(S1 * c) Q_V^T - diag(S1)) V1^T,  Q = cayley(X) = (I - K)(I + K)^{-1}, K = (X - X^T)/2,
    trainables X_U, X_V (r x r, zero, so Q = I) and c (r, ones); 2 r^2 + r per layer.
    Only the top-r block is rotated (the code's `idx` choice of another r-block is not offered).

Scale: the official spectral path has no alpha / r factor, so `scale` is 1 (config.alpha is ignored);
a number in config.scale multiplies dW [inferred knob, for sweeps].

Forward never forms M x N: ^A costs O(B r (M + N)), ^R O(B r (M + N) + r^3). The step-0 update is
exactly zero (A = B = 0; Q = I and c = 1 give a zero r x r core), so logits are bit-identical to
the base model, unlike the official bf16 W_rest rebuild. Merging adds dW to W0 exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from megaspec.adapters.base import Adapter, Plan
from megaspec.config import AdapterConfig
from megaspec.spectral.lowrank import cayley, top_singular


def _update_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for the dense update (the interface's contract), fp64 kept when the adapter is fp64."""
    return torch.promote_types(t.dtype, torch.float32)


class SpectralAdapter(Adapter):
    """Shared plan of ^A and ^R: the top-r singular triplets of W0 as buffers."""

    needs_weight = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = self.resolved_scale()

    @classmethod
    def check_config(cls, config: AdapterConfig, shape: tuple[int, int], name: str) -> None:
        r, (m, n) = config.lora_rank, shape
        if not 0 < r <= min(m, n):
            raise ValueError(f"lora_rank={r} must be in 1..{min(m, n)} for {cls.method} on layer {name} ({m}x{n})")

    def plan_layer(self, weight: torch.Tensor | None) -> Plan:
        u1, s1, v1 = top_singular(weight, self.config.lora_rank)
        return {"U1": u1, "S1": s1, "V1": v1}

    def local_plan(self, result: Any) -> Plan:
        return dict(result)

    def nominal_plan(self) -> Plan:
        (m, n), r = self.shape, self.config.lora_rank
        meta = {"dtype": torch.float32, "device": "meta"}
        return {"U1": torch.empty(m, r, **meta), "S1": torch.empty(r, **meta), "V1": torch.empty(n, r, **meta)}


class SpectralAdditiveAdapter(SpectralAdapter):
    """Spectral Adapter^A: dW = U1 S1 A + B S1 V1^T + B S1 A, A = B = 0 at init."""

    method = "spectral_a"

    def init_parameters(self) -> None:
        (m, n), r = self.shape, self.config.lora_rank
        self.spectral_A = self.new_parameter(lambda: torch.zeros(r, n), (r, n))
        self.spectral_B = self.new_parameter(lambda: torch.zeros(m, r), (m, r))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.spectral_A, self.spectral_B
        x = x.to(a.dtype)
        s = self.S1.to(a.dtype) * self.scale
        u1, v1 = self.U1.to(a.dtype), self.V1.to(a.dtype)
        # x dW^T = (x A^T) S1 (U1 + B)^T + (x V1) S1 B^T
        return ((x @ a.T) * s) @ (u1 + b).T + ((x @ v1) * s) @ b.T

    def delta_weight(self, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        dtype = _update_dtype(self.spectral_A)
        a, b = self.spectral_A.detach().to(dtype), self.spectral_B.detach().to(dtype)
        u1, s, v1 = self.U1.to(dtype), self.S1.to(dtype) * self.scale, self.V1.to(dtype)
        if row_ids is not None:
            u1, b = u1[row_ids], b[row_ids]
        return ((u1 + b) * s) @ a + (b * s) @ v1.T

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dW = (U1 + B) S A + B S V1^T as [(U1 + B) S, B S] [A; V1^T] (rank <= 2r)."""
        a, b = self.spectral_A.detach().double().cpu(), self.spectral_B.detach().double().cpu()
        u1, v1, s = self.U1.double().cpu(), self.V1.double().cpu(), self.S1.double().cpu() * self.scale
        return torch.cat([(u1 + b) * s, b * s], dim=1), torch.cat([a, v1.T], dim=0)


class SpectralRotationAdapter(SpectralAdapter):
    """Spectral Adapter^R: rotate U1, V1 by Cayley-orthogonal Q_U, Q_V and rescale S1 by c."""

    method = "spectral_r"

    def init_parameters(self) -> None:
        r = self.config.lora_rank
        self.X_U = self.new_parameter(lambda: torch.zeros(r, r), (r, r))
        self.X_V = self.new_parameter(lambda: torch.zeros(r, r), (r, r))
        self.c = self.new_parameter(lambda: torch.ones(r), (r,))

    def core(self, dtype: torch.dtype) -> torch.Tensor:
        """C = scale (Q_U diag(S1 c) Q_V^T - diag(S1)) (r x r), so that dW = U1 C V1^T.

        Computed in at least fp32 (no half-precision linear solve), whatever the parameters' dtype.
        """
        dtype = torch.promote_types(dtype, torch.float32)
        s1 = self.S1.to(dtype)
        q_u, q_v = cayley(self.X_U.to(dtype)), cayley(self.X_V.to(dtype))
        return ((q_u * (s1 * self.c.to(dtype))) @ q_v.T - torch.diag(s1)) * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.X_U.dtype
        x = x.to(dtype)
        # x dW^T = ((x V1) C^T) U1^T, with C^T = Q_V diag(S1 c) Q_U^T - diag(S1)
        return ((x @ self.V1.to(dtype)) @ self.core(dtype).T.to(dtype)) @ self.U1.to(dtype).T

    def delta_weight(self, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        dtype = _update_dtype(self.X_U)
        with torch.no_grad():
            core = self.core(dtype)
        u1 = self.U1.to(dtype) if row_ids is None else self.U1[row_ids].to(dtype)
        return (u1 @ core) @ self.V1.to(dtype).T

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dW = (U1 C) V1^T with the r x r core C."""
        with torch.no_grad():
            core = self.core(torch.float64).cpu()
        return self.U1.double().cpu() @ core, self.V1.double().cpu().T

    def rotated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current singular bases (U1 Q_U, V1 Q_V), orthonormal by construction."""
        with torch.no_grad():
            dtype = _update_dtype(self.X_U)
            return self.U1.to(dtype) @ cayley(self.X_U.to(dtype)), self.V1.to(dtype) @ cayley(self.X_V.to(dtype))
