"""Quantized frozen base: bitsandbytes load configs, ZeRO-3 compatibility, per-rank byte measurement.

`--quantize nf4|fp4` loads every linear of the decoder as a bnb Linear4bit (QLoRA's blockwise
4-bit, 64 weights per fp32 absmax, the absmax themselves quantized to 8 bits: double quant);
`--quantize int8` as a bnb Linear8bitLt (LLM.int8(): one int8 per weight, one fp32 scale per
output row). Embeddings, norms and lm_head stay in the run's dtype (bnb never converts them).

Under ZeRO-3 transformers loads a quantized model whole on every rank (it skips zero.Init for
quantized models); deepspeed.initialize then partitions the packed weights like any frozen
parameter. megaspec.quant_load builds the same partitioned model without the whole copy, by
quantizing on load. The quantization state (absmax, code tables, int8 row scales) is not a
parameter: it stays whole on every rank.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn

QUANTIZE_CHOICES = ("none", "nf4", "fp4", "int8")


def bnb_config(quantize: str, dtype: torch.dtype) -> Any:
    """The transformers BitsAndBytesConfig for `quantize` (None for "none"), computing in `dtype`.

    bnb_4bit_quant_storage = dtype packs the 4-bit codes into tensors of the run's dtype: ZeRO-3
    then flattens and partitions them like the other frozen weights, and DeepSpeed's bf16 cast
    of floating parameters at initialize (engine._cast_module_mixed_precision) finds nothing to
    change (it would reinterpret packed codes stored as fp32 or fp16 as numbers and corrupt them).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
        bnb_4bit_use_double_quant=True,
    )


def prepare_quantized(model: nn.Module) -> int:
    """Make the model's bnb linears safe to adapt, shard and merge; returns how many it touched.

    Linear4bit: on CPUs with AVX512-BF16 an eval-mode, no-grad forward repacks the weight in place
    into a layout with bf16 absmax (bitsandbytes' CPU inference kernel), which changes the weight
    that training, planning and merging see; megaspec keeps the standard layout.

    Linear8bitLt: bitsandbytes computes from a reference to the int8 codes kept in the layer's
    MatmulLtState (state.CB), taken from the weight at the first forward. Under ZeRO-3 that
    reference would keep the whole int8 weight alive on every rank after partitioning, and the
    backward would read it instead of the gathered data; the state is replaced by one whose CB
    is always the weight's current data (whatever ZeRO-3 has gathered into it).
    """
    import bitsandbytes as bnb

    touched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            touched += 1
        elif isinstance(module, bnb.nn.Linear8bitLt) and not module.state.has_fp16_weights:
            module.state = _weight_backed_state(module)
            touched += 1
    return touched


def _weight_backed_state(module: nn.Module) -> Any:
    """A MatmulLtState for `module` whose CB reads module.weight.data (row scales SCB kept as is)."""
    old = module.state
    state = _weight_backed_state_class()()
    # instance attributes, not only dataclass fields: Linear8bitLt sets has_fp16_weights, threshold, ...
    state.__dict__.update({key: value for key, value in vars(old).items() if key != "CB"})
    state.module = module
    weight_scale = getattr(module.weight, "SCB", None)
    state.SCB = weight_scale if weight_scale is not None else old.SCB
    module.weight.CB = None
    module.weight.SCB = None
    return state


@functools.cache
def _weight_backed_state_class() -> type:
    """bitsandbytes' MatmulLtState with CB bound to the layer's weight (built on first use: bnb imports lazily)."""
    from bitsandbytes import MatmulLtState

    class WeightBackedState(MatmulLtState):
        """state.CB is the layer's int8 weight data; assignments to it are ignored (no second copy)."""

        module: nn.Module

        @property
        def CB(self) -> torch.Tensor:  # noqa: N802 (bitsandbytes' name)
            return self.module.weight.data

        @CB.setter
        def CB(self, value: torch.Tensor | None) -> None:  # noqa: N802
            pass

    return WeightBackedState


def _quant_state_tensors(state: Any) -> Iterator[torch.Tensor]:
    """The tensors of a bnb QuantState (absmax, code table, offset), nested state included."""
    for key in ("absmax", "code", "offset"):
        value = getattr(state, key, None)
        if isinstance(value, torch.Tensor):
            yield value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _quant_state_tensors(nested)


def _held(module: nn.Module, param: nn.Parameter) -> Iterator[tuple[str, torch.Tensor]]:
    """(kind, tensor) for every tensor this rank holds for one frozen parameter."""
    if hasattr(param, "ds_tensor"):
        yield "partition", param.ds_tensor
        scale = getattr(param.ds_tensor, "ds_quant_scale", None)
        if scale is not None:
            yield "partition", scale
        if getattr(param, "ds_secondary_tensor", None) is not None:
            yield "partition", param.ds_secondary_tensor
    quantized = getattr(param, "quant_state", None) is not None or hasattr(param, "SCB")
    yield ("packed" if quantized else "plain"), param.data
    for tensor in _quant_state_tensors(getattr(param, "quant_state", None)):
        yield "quant_state", tensor
    for key in ("CB", "SCB"):
        value = getattr(param, key, None)
        if isinstance(value, torch.Tensor):
            yield ("packed" if key == "CB" else "quant_state"), value
    state = getattr(module, "state", None)
    for key in ("CB", "SCB"):
        value = getattr(state, key, None)
        if isinstance(value, torch.Tensor):
            yield ("packed" if key == "CB" else "quant_state"), value


def frozen_bytes(model: nn.Module, modules: Collection[str] | None = None) -> dict[str, int]:
    """Bytes this rank holds right now for frozen weights, measured from their tensors' storages.

    Kinds: "plain" (ordinary frozen tensors), "packed" (bnb 4-bit codes / int8 weights),
    "quant_state" (absmax, code tables, nested state, int8 row scales), "partition" (ZeRO-3
    shards, DeepSpeed's own int8 scales included), and "total". Each storage is counted once,
    whole (a view holds its whole storage), so tied or shared tensors are not double counted.
    `modules`: count only these modules (by name) and their submodules (default: all).
    """
    counts = {"plain": 0, "packed": 0, "quant_state": 0, "partition": 0}
    seen: set[tuple[str, int]] = set()
    for name, module in model.named_modules():
        if modules is not None and not any(name == m or name.startswith(m + ".") for m in modules):
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                continue
            for kind, tensor in _held(module, param):
                storage = tensor.untyped_storage()
                key = (str(tensor.device), storage.data_ptr())
                if storage.nbytes() == 0 or key in seen:
                    continue
                seen.add(key)
                counts[kind] += storage.nbytes()
    counts["total"] = sum(counts.values())
    return counts


def zero_weight_quantization(ds_config: dict[str, Any]) -> str | None:
    """The DeepSpeed ZeRO++ weight-quantization key the config turns on (qwZ), if any."""
    zero = ds_config.get("zero_optimization", {})
    keys = ("zero_quantized_nontrainable_weights", "zero_quantized_weights")
    return next((key for key in keys if zero.get(key)), None)


def check_quantization(ds_config: dict[str, Any], quantize: str) -> None:
    """One clear error for combinations that cannot run, before any weight is loaded."""
    key = zero_weight_quantization(ds_config)
    if key is not None and quantize != "none":
        raise ValueError(
            f"--quantize {quantize} and {key} in --ds_config both quantize the frozen base: DeepSpeed would "
            "re-quantize bitsandbytes' packed codes as if they were numbers; choose one"
        )


class TorchGroupQuantizer:
    """DeepSpeed's symmetric 8-bit group quantizer op (QuantizerBuilder) in torch, for qwZ without CUDA.

    The same contract and arithmetic as csrc/quantization (quantization_utils.h, Params<Symmetric,
    8>), which CUDAQuantizer calls: the fp16 input is split into `groups` contiguous groups; per
    group scale = 2^8 / (2 absmax) (1 if absmax = 0), q = clamp(rint(x scale), -128, 127) as int8
    shaped like x, and fp32 params hold 1 / scale; dequantize returns fp16 q * params. The params are
    a flat (groups,) tensor where the CUDA op returns (groups, 1): DeepSpeed all-gathers them into a
    flat buffer, which NCCL takes by element count but gloo (CPU) refuses unless the shapes match.
    DeepSpeed has no CPU kernel for it ("This op had not been implemented on CPU backend"), so
    without this ds_configs/zero3_qwz.json could not run, or be tested, off a GPU.
    """

    Symmetric, Asymmetric = 0, 1

    def quantize(self, x: torch.Tensor, groups: int, bits: int, kind: int) -> list[torch.Tensor]:
        self._supported(bits, kind)
        flat = x.reshape(groups, -1).float()
        absmax = flat.abs().amax(dim=1, keepdim=True)
        scale = torch.where(absmax == 0, torch.ones_like(absmax), 256.0 / (2 * absmax))
        codes = torch.round(flat * scale).clamp_(-128, 127).to(torch.int8)
        return [codes.view(x.shape), torch.reciprocal(scale).view(groups)]

    def dequantize(self, codes: torch.Tensor, params: torch.Tensor, groups: int, bits: int, kind: int) -> torch.Tensor:
        self._supported(bits, kind)
        return (codes.reshape(groups, -1).float() * params.reshape(groups, 1)).half().view(codes.shape)

    @staticmethod
    def _supported(bits: int, kind: int) -> None:
        if bits != 8 or kind != TorchGroupQuantizer.Symmetric:
            raise NotImplementedError(f"torch group quantizer: only symmetric 8-bit (qwZ's), not {bits}-bit kind {kind}")


def provide_zero_quantizer() -> str:
    """The quantizer DeepSpeed's qwZ will use: its CUDA op on a GPU, else TorchGroupQuantizer.

    Call before zero.Init (from_pretrained under HfDeepSpeedConfig) builds its CUDAQuantizer,
    which would otherwise try to load the CUDA op and fail on a CPU-only machine.
    """
    from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

    if torch.cuda.is_available():
        return "cuda"
    if not isinstance(CUDAQuantizer.quantizer_cuda_module, TorchGroupQuantizer):
        CUDAQuantizer.quantizer_cuda_module = TorchGroupQuantizer()
    return "torch"


def quantize_frozen_partitions(model: nn.Module) -> int:
    """DeepSpeed qwZ for a base frozen after zero.Init: store each frozen ZeRO-3 shard in int8 now.

    zero.Init quantizes a shard only if its parameter is already frozen when it is partitioned,
    but transformers builds every parameter trainable. This does what DeepSpeed's
    quantize_nontrainable_params (stage3.py) does, without its fp16-only assertion (the quantizer
    converts to fp16 itself and every gather dequantizes back to the parameter's dtype), and
    skips the same small shards. Gathers then dequantize, so planning, training and merging all
    see the same int8-rounded weights. Returns the number of shards quantized.

    At world size 1 the "shard" is the whole weight and DeepSpeed fetches it with NoGatherHandle,
    which dequantizes through the class attribute Init.quantizer_module that DeepSpeed 0.19.8 never
    sets (only instances get one): it is set here, so one GPU gets the int8 storage too.
    """
    from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer, Init

    quantizer = getattr(Init, "quantizer_module", None) or CUDAQuantizer()
    Init.quantizer_module = quantizer
    count = 0
    for param in model.parameters():
        shard = getattr(param, "ds_tensor", None)
        if param.requires_grad or shard is None or hasattr(shard, "ds_quant_scale") or param.ds_persist:
            continue
        if shard.numel() <= 2048 or param.ds_numel <= 500_000:  # DeepSpeed's own cut for small weights
            continue
        quantized, scale = quantizer.quantize(shard)
        quantized.ds_quant_scale = scale
        quantized.ds_numel, quantized.status, quantized.final_location = shard.ds_numel, shard.status, shard.final_location
        quantized.requires_grad = False
        param.ds_tensor = quantized
        count += 1
    return count
