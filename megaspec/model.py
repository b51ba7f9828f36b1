"""Model surgery: find target linears in an HF model, wrap them, freeze the rest; save, load, merge."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megaspec.adapters import Adapter, adapter_class, dense_weight, is_quantized
from megaspec.calibrate import calibrate_adapters, calibrating
from megaspec.config import AdapterConfig
from megaspec.distributed import gather_params, plan_adapters

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
LAYERS_NAME = "adapter_layers.json"
# Decoders whose layers hold LLaMA's seven projections (q/k/v/o_proj, gate/up/down_proj) as plain
# nn.Linear, which the adapters target by name; tests/test_bad_inputs.py checks each on the meta device.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class AdapterSummary:
    """What apply_adapters did: per-layer trainable counts and the total."""

    method: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    nominal: bool = False  # meta-device model: per-layer counts of a global plan are nominal
    plan: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        head = f"{self.method}: {self.trainable:,} trainable of {self.total:,} parameters ({share:.4f}%) in {len(self.layers)} layers"
        rows = [f"  {r['name']:<48} {r['shape'][0]:>6}x{r['shape'][1]:<6} {r['trainable']:>10,}" for r in self.layers]
        return "\n".join([head, *rows])


def find_targets(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Names of linear layers matching any target, as peft matches: exact name or '.'-suffix."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, Adapter):
            if any(name == t or name.endswith("." + t) for t in target_modules):
                names.append(name)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {list(target_modules)} match no linear layer; the model's linear layers are {linear}")
    return names


def _wrap(model: nn.Module, config: AdapterConfig, names: list[str]) -> dict[str, Adapter]:
    """Replace each named linear by its adapter (no plan yet)."""
    cls = adapter_class(config.method)
    adapters = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = cls(getattr(parent, child), config, name, n_layers=len(names))
        setattr(parent, child, adapter)
        adapters[name] = adapter
    return adapters


def adapters_of(model: nn.Module) -> dict[str, Adapter]:
    """The model's adapters by the name of the linear they wrap."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Adapter)}


def _is_meta(adapters: dict[str, Adapter]) -> bool:
    return any(a.device.type == "meta" for a in adapters.values())


def apply_adapters(
    model: nn.Module,
    config: AdapterConfig,
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
    defer_calibration: bool = False,
) -> AdapterSummary:
    """Wrap the target linears in place, freeze everything else, plan (collectively) and summarise.

    Methods that plan from data (S2FT) get a provisional plan (delta == 0), then are calibrated on
    `calibration`: batches of model inputs with labels (megaspec.calibrate; ignored by the other
    methods). Under ZeRO-3 the passes must run through the DeepSpeed engine, so the training loop
    passes defer_calibration=True and calls calibrate_adapters after deepspeed.initialize.
    """
    names = find_targets(model, config.target_modules)
    on_meta = model.get_submodule(names[0]).weight.device.type == "meta"
    data_planned = adapter_class(config.method).needs_calibration
    if data_planned and calibration is None and not defer_calibration and not on_meta:
        raise ValueError(
            f"method {config.method!r} plans from data: pass calibration=batches (inputs with labels), or "
            "defer_calibration=True and call megaspec.calibrate.calibrate_adapters after deepspeed.initialize"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = _wrap(model, config, names)
    if _is_meta(adapters):
        for adapter in adapters.values():
            adapter.apply_plan(adapter.nominal_plan())
        plan_info: dict[str, Any] = {}
    else:
        plan_info = plan_adapters(adapters)
        if calibrating(adapters) and calibration is not None:
            plan_info.update(calibrate_adapters(model, calibration))
    return summarize(model, config.method, nominal=_is_meta(adapters), plan=plan_info)


def summarize(model: nn.Module, method: str, nominal: bool = False, plan: dict[str, Any] | None = None) -> AdapterSummary:
    """Per-layer and total trainable counts of an adapted model."""
    layers = [a.layer_summary() for a in adapters_of(model).values()]
    total = sum(_numel(p) for p in model.parameters())
    return AdapterSummary(method, layers, trainable_parameter_count(model), total, nominal, plan or {})


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters (ZeRO-3 partitioned parameters count their full size)."""
    return sum(_numel(p) for p in model.parameters() if p.requires_grad)


def _is_writer() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """CPU copies of every adapter's plan buffers and parameters, and the per-layer manifest."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, adapter in adapters_of(model).items():
        params = dict(adapter.named_parameters(recurse=False))
        with gather_params(list(params.values())):
            for key, p in params.items():
                tensors[f"{name}.{key}"] = p.detach().float().cpu().clone()
        plan = adapter.plan_state()
        for key, buf in plan.items():
            tensors[f"{name}.{key}"] = buf.detach().cpu().clone()
        layers[name] = {"shape": list(adapter.shape), "plan": sorted(plan), "params": sorted(params)}
    return tensors, layers


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter (safetensors + config + per-layer manifest); each file replaced atomically."""
    directory = Path(directory)
    tensors, layers = adapter_state(model)
    if not layers:
        raise ValueError("the model has no megaspec adapters to save; call apply_adapters first")
    if _is_writer():
        config = next(iter(adapters_of(model).values())).config
        directory.mkdir(parents=True, exist_ok=True)
        _atomic(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt", "method": config.method}))
        _atomic(directory / LAYERS_NAME, lambda p: Path(p).write_text(json.dumps(layers, indent=1)))
        _atomic(directory / CONFIG_NAME, lambda p: Path(p).write_text(config.to_json()))
    return directory


def _atomic(path: Path, write: Any) -> None:
    """Write through a temp file, then rename; readable by others as the umask allows (safetensors writes 0600)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def load_adapter(model: nn.Module, directory: str | Path) -> AdapterSummary:
    """Wrap (if needed) and load a saved adapter; the saved plan is used as is, never recomputed."""
    directory = Path(directory)
    if not (directory / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}; point to a folder written by save_adapter")
    config = AdapterConfig.load(directory)
    layers = json.loads((directory / LAYERS_NAME).read_text())
    tensors = load_file(str(directory / WEIGHTS_NAME))
    existing = adapters_of(model)
    missing = [n for n in layers if n not in existing]
    if missing:
        for p in model.parameters():
            p.requires_grad_(False)
        _wrap(model, config, missing)
    adapters = adapters_of(model)
    for name, info in layers.items():
        adapter = adapters[name]
        if list(adapter.shape) != info["shape"]:
            raise ValueError(f"layer {name} is {list(adapter.shape)} in the model but {info['shape']} in the adapter at {directory}")
        saved_plan = {k: tensors[f"{name}.{k}"] for k in info["plan"]}
        if not adapter.planned:
            adapter.apply_plan(saved_plan)
        elif calibrating({name: adapter}):  # a plan made from data is restored, never recomputed
            adapter.set_plan(saved_plan)
        params = dict(adapter.named_parameters(recurse=False))
        with gather_params(list(params.values())), torch.no_grad():
            for key in info["params"]:
                params[key].copy_(tensors[f"{name}.{key}"].to(params[key].dtype))
    return summarize(model, config.method)


def load_plans(model: nn.Module, directory: str | Path) -> None:
    """Copy the saved plans of the model's data-planned adapters (S2FT) from `directory`, in place.

    Resuming a run restores the plan it trained with instead of calibrating again; parameters are
    left alone (the checkpoint's training state restores them, into the optimizer's own tensors).
    """
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    for name, adapter in calibrating(adapters_of(model)).items():
        missing = [k for k in adapter.plan_state() if f"{name}.{k}" not in tensors]
        if missing:
            raise ValueError(f"{directory} holds no {missing} for layer {name}; it is not this run's adapter")
        adapter.set_plan({k: tensors[f"{name}.{k}"] for k in adapter.plan_state()})


@torch.no_grad()
def merged_linear(adapter: Adapter, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear holding W0 + dW, summed in fp32 (W0 dequantized if the base is quantized).

    dtype defaults to the base's: its weight dtype, or for a bitsandbytes base the dtype it computes
    in (bnb_4bit_compute_dtype, the run's dtype, for 4-bit; fp32 for 8-bit, which keeps no dtype).
    """
    base = adapter.base
    weight = dense_weight(base) + adapter.delta_weight().to(base.weight.device)
    if dtype is None:
        dtype = (getattr(base, "compute_dtype", None) or torch.float32) if is_quantized(base) else base.weight.dtype
    linear = nn.Linear(adapter.in_features, adapter.out_features, bias=base.bias is not None, device=weight.device, dtype=dtype)
    linear.weight.copy_(weight)
    if base.bias is not None:
        linear.bias.copy_(base.bias.float())
    linear.requires_grad_(False)
    return linear


def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter's update into its base weight; the adapters become plain linears."""
    for name, adapter in adapters_of(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with gather_params(list(adapter.parameters())):
            setattr(parent, child, merged_linear(adapter, dtype))
    return model
