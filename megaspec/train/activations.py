"""How the forward keeps its activations: gradient checkpointing (on, off, auto) and the attention kernel.

Gradient checkpointing keeps only each decoder layer's input and recomputes the layer in the
backward (about one more forward per step) instead of holding every layer's saved tensors.
`auto` turns it on above AUTO_CHECKPOINTING_PARAMS parameters, counted from the model's config
on the meta device (under ZeRO-3 a rank's own parameters are partitioned shards, so the built
model cannot be counted directly). megaspec.benchmarks.memory uses the same rule for its
activation rows.

The checkpoint is non-reentrant (torch.utils.checkpoint with use_reentrant=False): it needs no
input that requires grad, so adapter parameters inside a layer of a frozen base still get their
gradients, and ZeRO-3's module hooks gather the frozen weights again for the recompute.
HF applies it only in training mode, so S2FT's calibration passes (eval mode) are unaffected.

The attention kernel is transformers' choice unless `attn_implementation` names one; it is
checked against the model class and, for flash_attention_2, the flash-attn package and CUDA
before anything is loaded (megaspec.train.validate), and installed right after the model is
built with `set_attn_implementation`, as from_pretrained(attn_implementation=...) would.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from megaspec.train.dsconfig import ConfigError

CHECKPOINTING_CHOICES = ("auto", "on", "off")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
AUTO_CHECKPOINTING_PARAMS = 1_000_000_000  # auto: on above ~1B parameters (LLaMA-3.2-1B has 1.24B)
# the model-class flag that says it supports each kernel (transformers 5 name, then 4.x name)
SUPPORT_FLAGS = {"sdpa": ("_supports_sdpa",), "flash_attention_2": ("_supports_flash_attn", "_supports_flash_attn_2")}


def model_class(config: Any) -> type[nn.Module]:
    """The causal-LM class transformers builds for `config`."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, AutoModelForCausalLM._model_mapping)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model type {getattr(config, 'model_type', '?')!r} has no causal-LM class in transformers") from e


def count_parameters(config: Any) -> int:
    """Parameters of the model `config` describes, built on the meta device (no memory, not partitioned)."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return sum(p.numel() for p in model.parameters())


def use_checkpointing(setting: str, n_params: int) -> tuple[bool, str]:
    """Whether to checkpoint, and why, for --gradient_checkpointing `setting` on an `n_params` model."""
    if setting not in CHECKPOINTING_CHOICES:
        raise ConfigError(f"--gradient_checkpointing {setting!r} is not one of {', '.join(CHECKPOINTING_CHOICES)}")
    if setting != "auto":
        return setting == "on", f"--gradient_checkpointing {setting}"
    on = n_params > AUTO_CHECKPOINTING_PARAMS
    return on, f"auto: {n_params:,} parameters {'>' if on else '<='} {AUTO_CHECKPOINTING_PARAMS:,}"


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing on every decoder layer of an HF model."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_attn_implementation(name: str | None, config: Any) -> None:
    """Refuse an attention kernel the model class, the packages or the machine cannot run (one line)."""
    if name is None:
        return
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"--attn_implementation {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    cls = model_class(config)
    flags = SUPPORT_FLAGS.get(name, ())
    if flags and not any(getattr(cls, flag, False) for flag in flags):
        raise ConfigError(f"--attn_implementation {name}: {cls.__name__} does not support it; use eager")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("--attn_implementation flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn); use sdpa")
        if not torch.cuda.is_available():
            raise ConfigError("--attn_implementation flash_attention_2 needs a CUDA GPU and this machine has none; use sdpa")


def configure_activations(model: nn.Module, checkpointing: str, attn_implementation: str | None) -> str:
    """Install the attention kernel and the checkpointing decision on a built model; returns the log line."""
    config = model.config
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation, config)
        model.set_attn_implementation(attn_implementation)
        if config._attn_implementation != attn_implementation:
            raise ConfigError(f"--attn_implementation {attn_implementation}: {type(model).__name__} kept "
                              f"{config._attn_implementation}")
    on, why = use_checkpointing(checkpointing, count_parameters(config))
    if on:
        enable_checkpointing(model)
    return f"gradient checkpointing {'on' if on else 'off'} ({why}); attention {config._attn_implementation}"
