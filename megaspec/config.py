"""Configuration dataclasses, and the flags and dict round trips generated from their fields.

Every option is declared once, as a dataclass field made by `option`: its default, its help text and,
where they matter, its choices, its flag spellings and whether --resume must match it. launch/train.py
builds its flags from the fields (`add_flags`, `from_flags`); a dict (the JSON saved beside an
adapter, a run's train_config.json, a YAML/JSON config file) applies to the same fields (`from_dict`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_TARGETS = ("q_proj", "v_proj")
Config = TypeVar("Config")


def option(
    default: Any, help: str, *, choices: tuple[str, ...] | None = None, flags: tuple[str, ...] | None = None,
    resume: bool | str = False, former: str | None = None,
) -> Any:
    """A dataclass field with its help text beside it.

    choices: the allowed values (checked by the flag parser); flags: the flag spellings (default
    --NAME; () for no flag); resume: True when --resume must find the saved run's value, "when_set"
    when it must only once it differs from the default (fields added after checkpoints existed, so
    those still resume); former: the field's earlier name, still read from saved dicts and used in
    the resume hash so runs saved under it load and resume.
    """
    metadata = {"help": help, "choices": choices, "flags": flags, "resume": resume, "former": former}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class AdapterConfig:
    """What to adapt and how (saved as adapter_config.json); method-specific fields are ignored by the other methods."""

    method: str = option("ssh", "ssh | fourierft | s2ft | lora | smoa | spectral_a | spectral_r", resume=True)
    target_modules: list[str] = option(list(DEFAULT_TARGETS), "comma-separated linear names", resume=True)
    n_coeffs: int = option(750, "sparse-spectrum methods (ssh, fourierft, s2ft): spectral coefficients per adapted layer",
                           resume=True)
    # 0.5 follows the paper, 0.2 is what the released code effectively does (docs/methods.md §2.2)
    energy_ratio: float = option(0.5, "SSH: fraction of positions chosen by DHT energy of W0 (the rest uniformly at random)",
                                 resume=True)
    selection: str = option("global", "SSH: global ranks energy candidates across all adapted layers (n_coeffs x layers "
                            "in total, docs/methods.md §2.4); per_layer gives every layer exactly n_coeffs",
                            choices=("global", "per_layer"), resume=True)
    min_per_layer: int = option(8, "SSH global selection: energy positions every layer keeps", resume="when_set")
    separable: bool = option(False, "SSH: the separable cas(u)cas(v) kernel of the released SSH code (docs/methods.md §1.1 (b))",
                             resume="when_set")
    scale: float | None = option(None, "update scale (default: the method's own, sqrt(M N) for sparse spectra, alpha/rank "
                                 "for LoRA and SMoA, 1 for Spectral Adapter)", resume=True)
    init: str = option("zeros", "coefficient init (gaussian: N(0, 1), as the SSH and FourierFT code)",
                       choices=("zeros", "gaussian"), resume=True)
    seed: int = option(2024, "seeds the plan and the parameters (a training run sets it to its --seed)", flags=())
    lora_rank: int = option(8, "low-rank methods (lora, smoa, spectral_a, spectral_r): rank r of the factors", resume=True,
                            former="rank")
    alpha: float = option(16.0, "LoRA and SMoA alpha (scale alpha / lora_rank)", resume=True)
    n_blocks: int = option(2, "SMoA: number of diagonal blocks K", resume="when_set")
    # S2FT's plan is read back from the checkpoint on --resume, so its options need not match
    s2ft_estimate_steps: int = option(4, "S2FT: optimizer steps' worth of batches in the gradient estimate that plans it")
    s2ft_gamma: float = option(1.5, "S2FT: exponent of the power prior |FFT2(estimate)|^gamma that draws the positions")

    def to_json(self) -> str:
        """Serialise for saving beside the adapter weights."""
        return json.dumps(to_dict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        """Inverse of to_json; unknown keys are an error so a typo never passes silently."""
        return from_dict(cls, json.loads(text))

    @classmethod
    def load(cls, directory: str | Path) -> AdapterConfig:
        """Read adapter_config.json from a saved adapter directory."""
        return cls.from_json((Path(directory) / "adapter_config.json").read_text())


# --- dicts ---------------------------------------------------------------------------------------
def to_dict(config: Any) -> dict[str, Any]:
    """The config as a nested dict of plain values (the shape `from_dict` reads back)."""
    return dataclasses.asdict(config)


def flat_dict(config: Any) -> dict[str, Any]:
    """One key per option, nested configs' fields lifted to the top (an outer field wins a shared name)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update({k: v for k, v in flat_dict(value).items() if k not in _own_names(type(config))})
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def from_dict(cls: type[Config], data: Mapping[str, Any]) -> Config:
    """`cls` from a dict: nested configs as their own mapping or with their fields at the top level.

    Unknown keys are an error listing the known ones, so a typo never passes silently; a field's
    former name (option `former`) is read as the field.
    """
    data = current_names(cls, data)
    known = _all_names(cls)
    unknown = sorted(set(data) - known)
    if unknown:
        what = re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()  # AdapterConfig -> adapter config
        raise ValueError(f"unknown {what} keys {unknown}; known keys are {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nested = _nested_class(cls, f)
        if nested is None:
            if f.name in data:
                kwargs[f.name] = data.pop(f.name)
            continue
        mine = dict(data.pop(f.name, None) or {})
        lifted = _all_names(nested) - _own_names(cls)
        mine.update({k: data.pop(k) for k in list(data) if k in lifted})
        kwargs[f.name] = from_dict(nested, mine)
    return cls(**kwargs)


def _former_names(cls: type) -> dict[str, str]:
    """{former name: field name} over `cls` and its nested configs."""
    out = {f.metadata["former"]: f.name for f in dataclasses.fields(cls) if f.metadata.get("former")}
    for f in dataclasses.fields(cls):
        nested = _nested_class(cls, f)
        if nested is not None:
            out.update(_former_names(nested))
    return out


def current_names(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with former field names replaced by the current ones (both given: an error)."""
    out, renamed = dict(data), _former_names(cls)
    for old, new in renamed.items():
        if old in out:
            if new in out:
                raise ValueError(f"both {old!r} and {new!r} are given; {old!r} is the former name of {new!r}, keep one")
            out[new] = out.pop(old)
    return out


def _nested_class(cls: type, f: dataclasses.Field) -> type | None:
    hint = typing.get_type_hints(cls)[f.name]
    return hint if dataclasses.is_dataclass(hint) else None


def _own_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _all_names(cls: type) -> set[str]:
    names = _own_names(cls)
    for f in dataclasses.fields(cls):
        nested = _nested_class(cls, f)
        if nested is not None:
            names |= _all_names(nested)
    return names


# --- flags ---------------------------------------------------------------------------------------
def _options(cls: type, defaults: Any) -> list[tuple[dataclasses.Field, Any, Any]]:
    """(field, its type, its default) of every option with a flag, nested configs' included."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out += [o for o in _options(type(value), value) if o[0].name not in _own_names(cls)]
        elif f.metadata.get("flags") != ():
            out.append((f, hints[f.name], value))
    return out


def _scalar(hint: Any) -> Any:
    """int for `int | None`, str for `list[str]`: the type of one command-line value."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _scalar(args[0])
    return args[0] if typing.get_origin(hint) is list else hint


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per option of `cls` (nested configs' fields included), with its help, default and choices."""
    for f, hint, default in _options(cls, cls()):
        flags = f.metadata.get("flags") or (f"--{f.name}",)
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help")}
        if hint is bool:
            parser.add_argument(*flags, action="store_true", **kwargs)
            continue
        if isinstance(default, list):
            default = ",".join(default)
        parser.add_argument(*flags, type=_scalar(hint), default=default, choices=f.metadata.get("choices"), **kwargs)


def from_flags(cls: type[Config], args: argparse.Namespace) -> Config:
    """`cls` from parsed flags (comma-separated lists split, blanks dropped)."""
    data = {}
    for f, hint, _ in _options(cls, cls()):
        value = getattr(args, f.name)
        if typing.get_origin(hint) is list and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        data[f.name] = value
    return from_dict(cls, data)


def resume_values(config: Any, former: bool = False) -> dict[str, Any]:
    """The options --resume must find unchanged (metadata resume), by name; nested configs' included.

    former=True names a renamed field by its former name, so a hash of these stays what it was when
    the run was saved.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            inner = resume_values(value, former)
            out.update({k: v for k, v in inner.items() if k not in _own_names(type(config))})
        elif f.metadata.get("resume") is True or (f.metadata.get("resume") == "when_set" and value != f.default):
            out[(former and f.metadata.get("former")) or f.name] = copy.deepcopy(value)
    return out
