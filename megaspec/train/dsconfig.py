"""Read a DeepSpeed JSON config and resolve its "auto" values the way HF's integration does."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch


class ConfigError(ValueError):
    """A bad user-supplied configuration, stated in one line with its fix."""


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`, or one clear ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {path} does not exist; pass a DeepSpeed JSON file such as ds_configs/zero3.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from e
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {path} must hold a JSON object, not {type(config).__name__}")
    return config


def bf16_available() -> bool:
    """bf16 training is used on GPUs that support it; CPU runs stay in fp32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage named in the config (0 when absent)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def resolve_ds_config(config: dict[str, Any], *, lr: float, max_steps: int, warmup_steps: int, hidden_size: int) -> dict[str, Any]:
    """A copy with every "auto" replaced (lr, schedule, precision, bucket sizes), as HF's Trainer does."""
    cfg = copy.deepcopy(config)

    def fill(section: dict[str, Any], key: str, value: Any) -> None:
        if section.get(key) == "auto":
            section[key] = value

    fill(cfg, "train_micro_batch_size_per_gpu", 4)
    fill(cfg, "gradient_accumulation_steps", 1)
    fill(cfg, "gradient_clipping", 1.0)
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]
    fill(cfg.setdefault("bf16", {"enabled": False}), "enabled", bf16_available())
    if "fp16" in cfg:
        fill(cfg["fp16"], "enabled", False)
    if cfg.get("bf16", {}).get("enabled") and not torch.cuda.is_available():
        cfg["bf16"]["enabled"] = False  # the CPU accelerator trains in fp32 (gloo, no bf16 kernels for everything)
    for key in ("lr",):
        fill(cfg.get("optimizer", {}).get("params", {}), key, lr)
    sched = cfg.get("scheduler", {}).get("params", {})
    fill(sched, "warmup_max_lr", lr)
    fill(sched, "warmup_min_lr", 0.0)
    fill(sched, "warmup_num_steps", warmup_steps)
    # update k runs at the scheduler's iteration k (loop.align_lr_schedule): with max_steps + 1 the
    # last update still has a non-zero LR under WarmupDecayLR
    fill(sched, "total_num_steps", max(max_steps + 1, warmup_steps + 1))
    if "scheduler" in cfg:
        sched.setdefault("warmup_type", "linear")
    zero = cfg.get("zero_optimization", {})
    fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
    fill(zero, "allgather_bucket_size", hidden_size * hidden_size)
    fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ConfigError(f"--ds_config has 'auto' values megaspec cannot resolve: {leftover}; set them to numbers")
    return cfg


def _walk(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [item for k, v in node.items() for item in _walk(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), node)]
