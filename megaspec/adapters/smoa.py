"""SMoA, Spectrum Modulation Adapter (Liu et al., arXiv 2605.21147; docs/methods.md §5).

Following the author code (misonsky/SMoA cpeft/tuners/smoa.py, as read in docs/methods.md §5):

Plan (needs the dense weight): a float64 thin SVD W0 = U diag(s) V^T; each output coordinate i is
scored by its energy-weighted mean singular index sum_j U[i,j]^2 s_j^2 j / sum_j U[i,j]^2 s_j^2, each
input coordinate b likewise with V (megaspec.spectral.lowrank.spectral_index_scores); rows and
columns are sorted by ascending score (stable argsort; this is the code's rule, whether the paper
uses the same one is unknown). Both orders are cut into K = n_blocks contiguous chunks with
torch.tensor_split sizes (ceil for the first n % K chunks): block k is R_k x C_k. Buffers:
row_perm (M), col_perm (N) and the chunk boundaries row_bounds, col_bounds (K + 1 each).

Trainables: per block a LoRA pair A_k (r_k x |C_k|, kaiming_uniform_(a=sqrt 5) as peft, all blocks
drawn in order from one layer_generator(seed, name)) and B_k (|R_k| x r_k, zeros), so dW = 0 at
step 0. The total rank r = config.lora_rank is split as in the code: r_k = r // K, plus one for the
first r % K blocks (lora_rank >= n_blocks is required; the code's `branch_ranks` is not offered).
Count: sum_k r_k (|R_k| + |C_k|) = r (M + N) / K for K dividing r, M and N.

Update: dW[R_k, C_k] = (alpha / r) (B_k A_k) ⊙ W0[R_k, C_k] with the *total* r, zero off the
block diagonal; config.scale, when set, replaces alpha / r. No dropout (the code's lora_dropout).

Anchors W0[R_k, C_k] are read from the base weight, never copied into the adapter (docs/methods.md §11):
saved adapters stay small, and a merged or re-planned model cannot pick up stale anchors. In
forward they are sliced inside a forward hook on the base linear, i.e. while the base weight is
materialised even under ZeRO-3, where DeepSpeed gathers it only for the base's own forward: the
hook is registered at wrap time, before deepspeed.initialize adds its release hook, so it runs
first [inferred DeepSpeed detail; a ZeRO-3 test covers it]. bitsandbytes bases are dequantized
there (as their own matmul does). delta() and delta_weight() outside forward need the weight
materialised (plain linear, or inside GatheredParameters, as merge_adapters does).

Cost per forward: the anchor slices (M N / K elements), the block products B_k A_k (r_k M N / K^2)
and a block-diagonal matmul of M N / K per token (1/K of the frozen layer's). Autograd keeps the
modulated blocks for backward: about M N / K per layer, the same as any exact SMoA training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megaspec.adapters.base import Adapter, Plan, dense_weight, is_quantized, layer_generator
from megaspec.config import AdapterConfig
from megaspec.spectral.lowrank import offsets, spectral_order, split_sizes


class SMoAAdapter(Adapter):
    method = "smoa"
    needs_weight = True
    update_reads_weight = True  # dW = (B_k A_k) * W0[R_k, C_k]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        (m, n), r, k = self.shape, self.config.lora_rank, self.config.n_blocks
        self.row_sizes, self.col_sizes = split_sizes(m, k), split_sizes(n, k)
        self.ranks = split_sizes(r, k)  # r // K each, one more for the first r % K blocks
        self.scale = self.resolved_scale()
        self._capture = False
        self._live: list[torch.Tensor] | None = None
        self.base.register_forward_hook(self._grab_anchors)

    @classmethod
    def check_config(cls, config: AdapterConfig, shape: tuple[int, int], name: str) -> None:
        (m, n), r, k = shape, config.lora_rank, config.n_blocks
        if not 0 < k <= min(m, n):
            raise ValueError(f"n_blocks={k} must be in 1..{min(m, n)} for smoa on layer {name} ({m}x{n})")
        if r < k:
            raise ValueError(f"lora_rank={r} must be at least n_blocks={k} for smoa (the rank is split over blocks)")

    def default_scale(self) -> float:
        return self.config.alpha / self.config.lora_rank

    # --- plan -----------------------------------------------------------------------------
    def plan_layer(self, weight: torch.Tensor | None) -> Plan:
        row_perm, col_perm = spectral_order(weight)
        return {"row_perm": row_perm.cpu(), "col_perm": col_perm.cpu()}

    def local_plan(self, result: Any) -> Plan:
        return {**result, "row_bounds": offsets(self.row_sizes), "col_bounds": offsets(self.col_sizes)}

    def nominal_plan(self) -> Plan:
        (m, n), k = self.shape, self.config.n_blocks
        meta = {"dtype": torch.long, "device": "meta"}
        return {
            "row_perm": torch.empty(m, **meta),
            "col_perm": torch.empty(n, **meta),
            "row_bounds": torch.empty(k + 1, **meta),
            "col_bounds": torch.empty(k + 1, **meta),
        }

    def init_parameters(self) -> None:
        if self.device.type != "meta":
            for key, sizes in (("row_bounds", self.row_sizes), ("col_bounds", self.col_sizes)):
                if not torch.equal(getattr(self, key).cpu(), offsets(sizes)):
                    raise ValueError(
                        f"layer {self.name}: saved {key} {getattr(self, key).tolist()} do not match "
                        f"n_blocks={self.config.n_blocks} ({offsets(sizes).tolist()})"
                    )
        generator = layer_generator(self.config.seed, self.name)
        for k, (rows, cols, r_k) in enumerate(zip(self.row_sizes, self.col_sizes, self.ranks, strict=True)):

            def kaiming(r_k: int = r_k, cols: int = cols) -> torch.Tensor:
                return nn.init.kaiming_uniform_(torch.empty(r_k, cols), a=math.sqrt(5), generator=generator)

            # direct attributes (no ParameterList): ZeRO-3 gathers a module's own parameters, and
            # save/load read named_parameters(recurse=False)
            setattr(self, f"lora_A_{k}", self.new_parameter(kaiming, (r_k, cols)))
            setattr(self, f"lora_B_{k}", self.new_parameter(lambda rows=rows, r_k=r_k: torch.zeros(rows, r_k), (rows, r_k)))

    # --- blocks and anchors ---------------------------------------------------------------
    def factors(self, k: int) -> tuple[nn.Parameter, nn.Parameter]:
        """(A_k, B_k) of block k."""
        return getattr(self, f"lora_A_{k}"), getattr(self, f"lora_B_{k}")

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(R_k, C_k): original row and column ids of each diagonal block, in reordered order."""
        rows = torch.split(self.row_perm, self.row_sizes)
        cols = torch.split(self.col_perm, self.col_sizes)
        return list(zip(rows, cols, strict=True))

    def base_weight(self) -> torch.Tensor:
        """W0 as held by the base (dequantized fp32 for bitsandbytes); it must be materialised now."""
        if is_quantized(self.base):
            return dense_weight(self.base)
        weight = self.base.weight
        if weight.numel() != self.out_features * self.in_features:
            raise RuntimeError(
                f"smoa layer {self.name}: the base weight is not materialised (ZeRO-3 partitioned); "
                "call delta/delta_weight inside deepspeed.zero.GatheredParameters, or run forward"
            )
        return weight.detach().reshape(self.shape)

    def anchors(self) -> list[torch.Tensor]:
        """W0[R_k, C_k] for every block k, sliced from the base weight (copies, base dtype)."""
        weight = self.base_weight()
        return [weight[rows[:, None], cols[None, :]] for rows, cols in self.blocks()]

    def _grab_anchors(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capture:
            self._live = self.anchors()

    # --- compute --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._capture, self._live = True, None
        try:
            out = self.base(x)
            anchors = self._live
        finally:
            self._capture, self._live = False, None
        if anchors is None:
            raise RuntimeError(f"smoa layer {self.name}: the base forward hook did not run")
        return out + self._delta(x, anchors).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._delta(x, self.anchors())

    def _delta(self, x: torch.Tensor, anchors: list[torch.Tensor]) -> torch.Tensor:
        """sum_k scatter_{R_k}( x[:, C_k] ((alpha/r)(B_k A_k) ⊙ W0[R_k, C_k])^T ), block by block."""
        dtype = self.lora_A_0.dtype
        x = x.to(dtype)
        parts = []
        for k, (_, cols) in enumerate(self.blocks()):
            a, b = self.factors(k)
            block = ((b @ a) * self.scale) * anchors[k].to(dtype)
            parts.append(x.index_select(-1, cols) @ block.T)
        permuted = torch.cat(parts, dim=-1)  # output columns in row_perm order
        return torch.zeros_like(permuted).index_copy(-1, self.row_perm, permuted)

    def delta_weight(self, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        dtype = torch.promote_types(self.lora_A_0.dtype, torch.float32)
        rows = torch.arange(self.out_features, device=self.row_perm.device) if row_ids is None else row_ids
        rows = rows.to(self.row_perm.device)
        weight = self.base_weight()
        position = torch.empty_like(self.row_perm)
        position[self.row_perm] = torch.arange(self.out_features, device=self.row_perm.device)
        where = position[rows]  # each requested row's place in the reordered basis
        out = torch.zeros(rows.numel(), self.in_features, dtype=dtype, device=weight.device)
        for k, (_, cols) in enumerate(self.blocks()):
            start, stop = int(self.row_bounds[k]), int(self.row_bounds[k + 1])
            picked = torch.nonzero((where >= start) & (where < stop)).flatten()
            if picked.numel() == 0:
                continue
            a, b = (p.detach().to(dtype) for p in self.factors(k))
            anchor = weight[rows[picked][:, None], cols[None, :]].to(dtype)
            out[picked[:, None], cols[None, :]] = ((b[where[picked] - start] @ a) * self.scale) * anchor
        return out
