"""Trainable parameters of every registered method at its paper setting, on meta-device LLaMA models.

Counts come from the code itself (apply_adapters on a meta-device model, then
trainable_parameter_count), not from a formula: a method's real parameter shapes are what is
counted, and nothing is allocated. The reference is LoRA r=8 on q,v (the SSH paper's comparison)
and LoRA r=8 on the setting's own targets.
"""

from __future__ import annotations

from typing import Any

from megaspec.benchmarks.common import LLAMA_CONFIGS, Setting, llama_config, meta_llama, paper_settings
from megaspec.model import apply_adapters, trainable_parameter_count

LORA_REFERENCE = Setting("lora r=8", "lora", {"lora_rank": 8, "alpha": 16.0})


def count(model_name: str, setting: Setting, **config_overrides: Any) -> tuple[int, int, int]:
    """(trainable, base parameters, adapted layers) of `setting` on a meta-device `model_name`."""
    model = meta_llama(llama_config(model_name, **config_overrides))
    base = sum(p.numel() for p in model.parameters())
    summary = apply_adapters(model, setting.config())
    return trainable_parameter_count(model), base, len(summary.layers)


def run(models: list[str] | None = None, methods: list[str] | None = None, **config_overrides: Any) -> list[dict[str, Any]]:
    """One row per (model, setting): trainable count, share of the base, ratios to LoRA r=8."""
    rows = []
    for model_name in models or list(LLAMA_CONFIGS):
        lora: dict[tuple[str, ...], int] = {}
        for setting in paper_settings(methods):
            trainable, base, layers = count(model_name, setting, **config_overrides)
            for targets in (("q_proj", "v_proj"), setting.targets):
                if targets not in lora:
                    reference = Setting(LORA_REFERENCE.label, "lora", LORA_REFERENCE.fields, targets)
                    lora[targets] = count(model_name, reference, **config_overrides)[0]
            rows.append({
                "model": model_name,
                "setting": setting.label,
                "method": setting.method,
                "targets": ",".join(t.removesuffix("_proj") for t in setting.targets),
                "layers": layers,
                "trainable": trainable,
                "base_params": base,
                "percent_of_base": 100.0 * trainable / base,
                "vs_lora8_qv": trainable / lora[("q_proj", "v_proj")],
                "lora8_same_targets": lora[setting.targets],
                "vs_lora8_same_targets": trainable / lora[setting.targets],
            })
    return rows


COLUMNS = [
    ("model", "model", ""),
    ("setting", "setting", ""),
    ("targets", "targets", ""),
    ("layers", "layers", "d"),
    ("trainable", "trainable", ",d"),
    ("percent_of_base", "% of base", ".4f"),
    ("vs_lora8_qv", "x LoRA8 q,v", ".4f"),
    ("lora8_same_targets", "LoRA8 same targets", ",d"),
    ("vs_lora8_same_targets", "x LoRA8 same", ".4f"),
]
