"""The world-size-independent part of a checkpoint: whole fp32 masters and optimizer moments by parameter name.

DeepSpeed's own files hold each rank's ZeRO partition, so they only load on the same number of
ranks. The trainable state is tiny (thousands of coefficients), so every checkpoint also holds it
whole, gathered with DeepSpeed's safe_get_full_* (ZeRO-3, ZeRO-1/2 and bf16 optimizers alike):

    param/<name>       fp32 master copy of a trainable parameter
    <moment>/<name>    optimizer state of that parameter (exp_avg, exp_avg_sq for Adam)

and the optimizer's step count beside them (Adam's bias correction depends on it), with the LR
schedule and, under fp16, the dynamic loss scaler's state. Restoring sets each rank's partitions by
name, so the state loads on any number of ranks, exactly.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from megaspec.distributed.comm import all_gather_object, rank

TENSORS = "training_state.safetensors"
PARAM = "param"


def inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed's ZeRO or bf16 wrapper drives (the engine's own one without a wrapper)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def trainable(engine: Any) -> list[tuple[str, nn.Parameter]]:
    """The engine module's trainable parameters by name, in module order (the same on every rank)."""
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _shape(param: nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def moment_keys(engine: Any) -> list[str]:
    """The per-element optimizer states (exp_avg, ...); none before the first update (torch creates them lazily)."""
    keys: set[str] = set()
    for state in inner_optimizer(engine).state.values():
        keys |= {k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
    return sorted(set().union(*all_gather_object(sorted(keys))))  # the same list on every rank: gathers follow it


def optimizer_step(engine: Any) -> int:
    """The optimizer's update count (Adam's `step`), 0 before the first update."""
    steps = [int(state["step"]) for state in inner_optimizer(engine).state.values() if "step" in state]
    return max(steps, default=0)


def _full(engine: Any, param: nn.Parameter, key: str | None) -> torch.Tensor:
    """The whole fp32 master (key None) or optimizer state `key` of `param`; collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:  # no ZeRO and no bf16 optimizer: the parameter is its own master copy
        value = param.data if key is None else inner_optimizer(engine).state[param][key]
    return value.detach().float().cpu().reshape(_shape(param)).clone()


def capture(engine: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scalars) of the trainable state; collective, every rank gets them whole."""
    keys = moment_keys(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in trainable(engine):
        tensors[f"{PARAM}/{name}"] = _full(engine, param, None)
        for key in keys:
            tensors[f"{key}/{name}"] = _full(engine, param, key)
    scalars = {"optimizer_step": optimizer_step(engine), "moments": keys, "lr_scheduler": _scheduler_state(engine),
               "loss_scale": loss_scale_state(engine)}
    return tensors, scalars


LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scale_state(engine: Any) -> dict[str, float] | None:
    """fp16's dynamic loss scaler: its scale and the counters that decide its next change (None: no dynamic scaler).

    Without it a resumed fp16 run starts again at the initial scale (2^16 by default), overflows and
    skips updates until the scale comes back down, so the run no longer matches an uninterrupted one.
    """
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return None
    return {name: float(getattr(scaler, name)) for name in LOSS_SCALE_FIELDS if hasattr(scaler, name)}


def set_loss_scale_state(engine: Any, state: dict[str, float] | None) -> None:
    """Put a dynamic loss scaler back where loss_scale_state found it (nothing for None or a static scaler)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if not state or scaler is None or not getattr(scaler, "dynamic", False):
        return
    for name, value in state.items():
        if name in LOSS_SCALE_FIELDS:
            setattr(scaler, name, value if name == "cur_scale" else int(value))


def _scheduler_state(engine: Any) -> dict[str, Any] | None:
    """The LR scheduler's state_dict when it is plain JSON (DeepSpeed's: its iteration), else None."""
    scheduler = engine.lr_scheduler
    if scheduler is None or not hasattr(scheduler, "state_dict"):
        return None
    state = scheduler.state_dict()
    try:
        json.dumps(state)
    except (TypeError, ValueError):
        return None  # not JSON: DeepSpeed's own schedules are set from the step by loop.align_lr_schedule
    return state


def _ensure_states(engine: Any, keys: list[str], step: int) -> None:
    """Give every optimizer tensor its states, zero-filled, where torch has not created them yet (a fresh engine)."""
    optimizer = inner_optimizer(engine)
    # ZeRO-3 puts one fp32 sub-group at a time into the torch optimizer's param_groups (at its step)
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    tensors = flat if flat is not None else [t for group in optimizer.param_groups for t in group["params"]]
    for tensor in tensors:
        state = optimizer.state[tensor]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        # torch's Adam keeps `step` as a float32 CPU scalar tensor (unless capturable/fused)
        old = state.get("step")
        like = old if torch.is_tensor(old) else torch.tensor(0.0)
        state["step"] = torch.tensor(float(step), dtype=like.dtype, device=like.device)
    # ZeRO-1/2 and the bf16 optimizer map each parameter's fragment to these states at their first step
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def _set_zero3_partition(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """Copy this rank's slice of the whole `value` into the fp32 master (key None) or optimizer state `key`.

    DeepSpeed's safe_set_full_* slices the unpadded value, which overruns on the last rank whenever
    the partition is padded (ds_numel not a multiple of the ranks); the local setter takes the padded slice.
    """
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    size = param.ds_tensor.numel()
    start = size * torch.distributed.get_rank(group=getattr(param, "ds_process_group", None))
    local = torch.zeros(size, dtype=torch.float32)
    chunk = value.flatten()[start : start + size]
    local[: chunk.numel()] = chunk
    local = local.to(param.ds_tensor.device)
    if key is None:
        safe_set_local_fp32_param(param, local)
    else:
        safe_set_local_optimizer_state(param, local, key)


def _set_module_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """Copy `value` into the module's (low-precision, possibly partitioned) parameter; collective under ZeRO-3."""
    import deepspeed

    partitioned = hasattr(param, "ds_id")
    # ZeRO-3: gathered whole, rank 0's copy is re-partitioned on exit (every rank holds the same value)
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=partitioned):
        if not partitioned or rank() == 0:
            param.data.copy_(value.to(param.dtype).reshape(param.data.shape))


def restore(engine: Any, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    """Set the fp32 masters, the module's parameters, the optimizer states and step, and the LR schedule; collective.

    Raises ValueError naming a parameter the checkpoint lacks or has in another shape.
    """
    keys, step = list(scalars.get("moments", [])), int(scalars.get("optimizer_step", 0))
    params = trainable(engine)
    for name, param in params:
        for key in (PARAM, *keys):
            saved = tensors.get(f"{key}/{name}")
            if saved is None or tuple(saved.shape) != tuple(_shape(param)):
                what = "lacks" if saved is None else f"has shape {tuple(saved.shape)} for"
                raise ValueError(f"the checkpoint {what} {key}/{name} (this run: {tuple(_shape(param))})")
    if keys:
        _ensure_states(engine, keys, step)
    optimizer = inner_optimizer(engine)
    for name, param in params:
        master = tensors[f"{PARAM}/{name}"]
        for key in (None, *keys):
            value = master if key is None else tensors[f"{key}/{name}"]
            if hasattr(param, "ds_id"):
                _set_zero3_partition(param, value, key)
            elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
                param.set_full_hp_param(value.to(param.device), key)
            elif key is not None:  # no wrapper: the parameter is its own master copy
                optimizer.state[param][key].copy_(value.reshape(param.shape))
        _set_module_param(param, master)
    scheduler = engine.lr_scheduler
    if scheduler is not None and scalars.get("lr_scheduler") is not None and hasattr(scheduler, "load_state_dict"):
        scheduler.load_state_dict(scalars["lr_scheduler"])
    set_loss_scale_state(engine, scalars.get("loss_scale"))
