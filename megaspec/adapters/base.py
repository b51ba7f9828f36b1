"""The one interface every method implements: wrap a frozen linear and add scale * delta(x).

Life cycle of an adapter (docs/design.md "Adapter interface"):

1. constructed around a frozen linear (nn.Linear, bnb Linear4bit/Linear8bitLt, or a ZeRO-3
   partitioned linear): no trainable state yet;
2. planned: `plan_layer(weight)` sees the dense fp32 weight of its own layer (gathered and
   dequantized by `megaspec.distributed`, possibly on another rank) and returns a small picklable
   result; `combine(results)` turns every layer's result into per-layer plans, identically on
   every rank (this is where a global, cross-layer choice happens); `apply_plan(plan)` stores
   the plan as buffers and creates the trainable parameters;
3. trained: forward returns base(x) + delta(x), never materialising an M x N update;
4. merged/exported: `delta_weight(row_ids)` gives a block of rows of the dense update, and
   `low_rank_factors()` an exact dW = B A where the method's structure has one.

Every capability the rest of megaspec asks of a method is declared here with its default
(`needs_weight`, `needs_calibration`, `update_reads_weight`, `trains_coefficients`, `default_lr`,
`default_scale`, `check_config`, `coeff_capacity`, `low_rank_factors`, `float64_rows`), so no
code outside megaspec/adapters/ tests what class an adapter is. A saved adapter holds the plan
buffers, so loading calls `apply_plan` with them and never plans again.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from megaspec.config import AdapterConfig

Plan = dict[str, torch.Tensor]


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, layer name): identical on every rank and every run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear, also when ZeRO-3 has emptied its weight."""
    return int(base.out_features), int(base.in_features)


def is_quantized(base: nn.Module) -> bool:
    """Whether the linear holds a bitsandbytes 4-bit or 8-bit weight."""
    return _quant_state(base) is not None or _int8_scale(base) is not None


def _quant_state(base: nn.Module) -> Any:
    """The QuantState of a bnb Linear4bit (on its weight, or on the module when FSDP lost it)."""
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def _int8_scale(base: nn.Module) -> torch.Tensor | None:
    """The per-row scales (SCB) of a bnb Linear8bitLt: on the weight until the first forward, then on its state."""
    if base.weight.dtype != torch.int8:
        return None
    scale = getattr(base.weight, "SCB", None)
    return scale if scale is not None else getattr(getattr(base, "state", None), "SCB", None)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The full fp32 weight of a (gathered) linear, dequantizing bitsandbytes 4-bit/8-bit layers.

    The result is the weight bitsandbytes' own training forward multiplies by on CPU (bit for
    bit): dequantize_4bit for 4-bit, CB * (SCB / 127) in that order for 8-bit (MatMul8bitFp).
    """
    weight = base.weight
    state = _quant_state(base)
    if state is not None:  # bnb Params4bit
        if getattr(state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed(weight.data, state)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state).float().reshape(linear_shape(base))
    scale = _int8_scale(base)
    if scale is not None:  # bnb Int8Params
        return (weight.data.float() * scale.float().unsqueeze(1).mul(1.0 / 127.0)).reshape(linear_shape(base))
    return weight.data.float()


def _dequantize_cpu_packed(data: torch.Tensor, state: Any) -> torch.Tensor:
    """fp32 weight of a Linear4bit repacked by bitsandbytes' AVX512-BF16 CPU inference kernel.

    That layout (bitsandbytes.functional._convert_weight_packed_for_cpu) stores an (N, K) weight
    as (N, K/2) bytes, each row block of 32 interleaved low/high nibble-wise, with bf16 absmax of
    shape (K/blocksize, N); it is written in place by an eval-mode, no-grad forward.
    """
    n, k = (int(s) for s in state.shape)
    packed = data.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1).reshape(n // 32, k // 2, 32, 2)
    codes = codes.transpose(1, 2).reshape(n, k).long()
    scale = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)
    return state.code.float()[codes] * scale


class Adapter(nn.Module):
    """Base class: y = base(x) + delta(x); subclasses define the plan, parameters and delta."""

    method: ClassVar[str] = ""
    # whether plan_layer needs the dense frozen weight (it is gathered only for those that do)
    needs_weight: ClassVar[bool] = False
    # whether the plan comes from data, a gradient estimate taken after deepspeed.initialize (megaspec.calibrate)
    needs_calibration: ClassVar[bool] = False
    # whether delta_weight reads the frozen weight W0 (export then gives it the weights the run trained against)
    update_reads_weight: ClassVar[bool] = False
    # whether the method trains config.n_coeffs spectral coefficients per layer (n_coeffs is unused otherwise)
    trains_coefficients: ClassVar[bool] = False
    # the peak learning rate of a run that does not set --lr
    default_lr: ClassVar[float] = 1e-3

    def __init__(self, base: nn.Module, config: AdapterConfig, name: str, n_layers: int = 1) -> None:
        super().__init__()
        self.base = base
        self.config = config
        self.name = name
        self.n_layers = n_layers
        self.out_features, self.in_features = linear_shape(base)
        self.planned = False
        self.check_config(config, self.shape, name)

    # --- configuration --------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: AdapterConfig, shape: tuple[int, int], name: str) -> None:
        """Raise ValueError (one line) when `config` cannot apply to layer `name` of `shape`; before anything is built."""

    @classmethod
    def coeff_capacity(cls, shape: tuple[int, int]) -> int:
        """The most coefficients a layer of `shape` can train (methods with trains_coefficients)."""
        return shape[0] * shape[1]

    def default_scale(self) -> float:
        """The update's scale when config.scale is None."""
        return 1.0

    def resolved_scale(self) -> float:
        """config.scale when given, else the method's default_scale."""
        return self.default_scale() if self.config.scale is None else float(self.config.scale)

    @property
    def shape(self) -> tuple[int, int]:
        """(M, N) = (out_features, in_features)."""
        return self.out_features, self.in_features

    # --- planning -------------------------------------------------------------------------
    def plan_layer(self, weight: torch.Tensor | None) -> Any:
        """Per-layer plan input computed from the dense fp32 weight (None if needs_weight is False)."""
        return None

    @classmethod
    def shrink_results(cls, adapters: dict[str, Adapter], local: dict[str, Any]) -> dict[str, Any]:
        """This rank's results less what `combine` can never use, judged from them alone (no collectives).

        Called after every layer this rank plans, so a rank holds O(budget) results, not O(layers x
        budget). `combine` on the shrunk results must give the same plans as on the full ones.
        """
        return local

    @classmethod
    def select_results(
        cls, adapters: dict[str, Adapter], local: dict[str, Any], gather: Callable[[Any], list[Any]]
    ) -> dict[str, Any]:
        """This rank's results less what `combine` will not use, agreed over all ranks through `gather`.

        A collective: every rank calls it once per adapter class, in layer order, before the results
        are all-gathered; `gather(obj)` returns every rank's obj. Same contract as `shrink_results`.
        """
        return local

    @classmethod
    def combine(cls, adapters: dict[str, Adapter], results: dict[str, Any]) -> dict[str, Plan]:
        """Per-layer plans from all layers' results; pure and deterministic (runs on every rank)."""
        return {name: adapter.local_plan(results.get(name)) for name, adapter in adapters.items()}

    def local_plan(self, result: Any) -> Plan:
        """The plan of one layer when it needs nothing from other layers."""
        return {}

    def nominal_plan(self) -> Plan:
        """A plan of the right sizes on the meta device, for counting parameters of huge models."""
        return {}

    def apply_plan(self, plan: Plan) -> None:
        """Register the plan as buffers and create the trainable parameters."""
        for key, value in plan.items():
            self.register_buffer(key, value.detach().clone().to(self.device), persistent=True)
        self.init_parameters()
        self.planned = True

    @property
    def device(self) -> torch.device:
        """Where the frozen weight lives (meta for parameter counting; cuda/cpu otherwise)."""
        return self.base.weight.device

    def new_parameter(self, make: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> nn.Parameter:
        """A trainable parameter made on CPU (seeded generators are CPU-only), then moved to `device`.

        On the meta device nothing is made: counting a 70B model's adapters allocates no memory.
        """
        if self.device.type == "meta":
            return nn.Parameter(torch.empty(shape, device="meta"))
        return nn.Parameter(make().to(self.device))

    def init_parameters(self) -> None:
        """Create trainable parameters (delta == 0 at step 0 unless the paper says otherwise)."""
        raise NotImplementedError

    def plan_state(self) -> Plan:
        """The buffers that make up this layer's plan (saved with the adapter)."""
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    # --- compute --------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """x @ dW.T, with the method's scale included."""
        raise NotImplementedError

    def delta_weight(self, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `row_ids` (default all) of the dense fp32 update dW (scale included)."""
        raise NotImplementedError

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An exact float64 CPU (B, A) with dW = B A (scale included) from the method's structure; None when unknown.

        Export reduces it to its numerical rank; without it export takes an SVD of delta_weight's rows.
        """
        return None

    def float64_rows(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """row_ids -> float64 CPU rows of dW by a cheaper exact path than a float64 copy of the adapter; None: no such path."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.delta(x).to(out.dtype)

    def trainable_count(self) -> int:
        """Trainable parameters of this adapter (ZeRO-3 aware)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.parameters(recurse=False) if p.requires_grad)

    def layer_summary(self) -> dict[str, Any]:
        """One row of the apply_adapters summary."""
        return {"name": self.name, "shape": list(self.shape), "trainable": self.trainable_count()}

    def extra_repr(self) -> str:
        return f"method={self.method}, shape={self.shape}, trainable={self.trainable_count()}"


def ortho_scale(shape: tuple[int, int]) -> float:
    """Default scale for the sparse-spectrum methods: sqrt(M N), i.e. unit-Frobenius basis functions.

    dW = scale * IDHT2(S) = scale * DHT2(S) / (MN); with scale = sqrt(MN) every coefficient moves
    the weight by a unit-norm pattern, so one learning rate suits every layer shape. A number
    given in the config replaces it (paper parity: SSH's code hard-codes 49).
    """
    return math.sqrt(shape[0] * shape[1])
