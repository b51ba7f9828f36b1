"""Read a DeepSpeed JSON config and resolve its "auto" values the way HF's integration does."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch


class ConfigError(ValueError):
    """A bad user-supplied configuration, stated in one line with its fix."""


REPO = Path(__file__).resolve().parents[2]  # a source checkout: ds_configs/ sits here


def ds_config_example(path: Path) -> str:
    """A DeepSpeed JSON file to suggest for a missing --ds_config: the repo's own copy of `path` (absolute) when
    a relative path names one (run from another folder), else the repo's zero3.json, else ds_configs/zero3.json."""
    for candidate in ([REPO / path] if not path.is_absolute() else []) + [REPO / "ds_configs" / "zero3.json"]:
        if candidate.is_file() and candidate.suffix == ".json":
            return str(candidate)
    return "ds_configs/zero3.json"


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`, or one clear ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {path} does not exist; pass a DeepSpeed JSON file such as {ds_config_example(path)}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from e
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {path} must hold a JSON object, not {type(config).__name__}")
    return config


# Numbers DeepSpeed reads without checking their type (get_scalar_param, torch optimizer and LR schedule
# arguments): a string there fails deep inside DeepSpeed or torch. The pydantic-checked sections
# (zero_optimization, fp16, ...) report their own errors. Each entry: (section path, key) -> rule.
POSITIVE_INT, POSITIVE, NON_NEGATIVE, FRACTION = "a whole number of 1 or more", "a number above 0", "a number of 0 or more", "a number in [0, 1)"
DS_NUMBERS: dict[tuple[str, str], str] = {
    ("", "train_batch_size"): POSITIVE_INT,
    ("", "train_micro_batch_size_per_gpu"): POSITIVE_INT,
    ("", "gradient_accumulation_steps"): POSITIVE_INT,
    ("", "steps_per_print"): POSITIVE_INT,
    ("", "gradient_clipping"): NON_NEGATIVE,
    ("", "gradient_predivide_factor"): POSITIVE,
    ("optimizer.params", "lr"): POSITIVE,
    ("optimizer.params", "eps"): POSITIVE,
    ("optimizer.params", "weight_decay"): NON_NEGATIVE,
    ("optimizer.params", "momentum"): NON_NEGATIVE,
    ("scheduler.params", "warmup_min_lr"): NON_NEGATIVE,
    ("scheduler.params", "warmup_max_lr"): POSITIVE,
    ("scheduler.params", "warmup_num_steps"): NON_NEGATIVE,
    ("scheduler.params", "total_num_steps"): POSITIVE_INT,
}
DS_STRINGS = {("scheduler.params", "warmup_type")}  # the only string a schedule or optimizer argument may be
DS_BOOLS = {("bf16", "enabled"), ("fp16", "enabled")}


def _fits(value: Any, rule: str) -> bool:
    """Whether a JSON value is a number that obeys `rule` (true/false are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if rule == POSITIVE_INT:
        return float(value).is_integer() and value >= 1
    if rule == POSITIVE:
        return value > 0
    if rule == FRACTION:
        return 0 <= value < 1
    return value >= 0


def check_ds_numbers(config: dict[str, Any], path: str | Path) -> None:
    """One ConfigError naming the first key whose value DeepSpeed would read as a number but is not one.

    "auto" is left to resolve_ds_config. Unlisted optimizer and schedule arguments must be numbers
    or true/false too (betas: two numbers in [0, 1)), since torch receives them as they are.
    """
    for (where, key), rule in DS_NUMBERS.items():
        section = _section(config, where)
        if key in section and section[key] != "auto" and not _fits(section[key], rule):
            raise ConfigError(f"--ds_config {path}: {_name(where, key)} is {json.dumps(section[key])} but must be {rule}; fix the file")
    for where, key in DS_BOOLS:
        value = _section(config, where).get(key, False)
        if not isinstance(value, bool) and value != "auto":
            raise ConfigError(f"--ds_config {path}: {_name(where, key)} is {json.dumps(value)} but must be true, false or \"auto\"; fix the file")
    for where in ("optimizer.params", "scheduler.params"):
        for key, value in _section(config, where).items():
            if (where, key) in DS_NUMBERS or (where, key) in DS_STRINGS or value == "auto" or isinstance(value, bool) or value is None:
                continue
            if key == "betas":
                if not (isinstance(value, list) and len(value) == 2 and all(_fits(v, FRACTION) for v in value)):
                    raise ConfigError(f"--ds_config {path}: {_name(where, key)} is {json.dumps(value)} but must be two numbers in [0, 1); fix the file")
            elif not (isinstance(value, int | float) and math.isfinite(value)):
                raise ConfigError(f"--ds_config {path}: {_name(where, key)} is {json.dumps(value)} but must be a number; fix the file")


def _section(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The dict at a dotted path of the config ({} if absent or not a dict)."""
    node: Any = config
    for part in filter(None, where.split(".")):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def _name(where: str, key: str) -> str:
    """A key as the user wrote it: dotted below the top level."""
    return f"{where}.{key}" if where else key


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
    if not torch.cuda.is_available():  # the CPU accelerator trains in fp32 (gloo, no bf16 kernels for everything,
        for precision in ("bf16", "fp16"):  # no fp16 at all), so a GPU config also runs on CPU ranks
            if cfg.get(precision, {}).get("enabled"):
                cfg[precision]["enabled"] = False
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
