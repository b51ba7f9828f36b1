"""Configuration dataclasses, and the flags and dict round trips generated from their fields.

Every option is declared once, as a dataclass field made by `option`: its default, its help text and,
where they matter, its choices, its flag spellings and whether --resume must match it. launch/train.py
builds its flags from the fields (`add_flags`, `from_flags`); a dict (the JSON saved beside an
adapter, a run's train_config.json) applies to the same fields (`from_dict`). A YAML/JSON config file
(`--config`, `read_config_file`) is checked key by key and type by type, and flags given on the command
line override it (`parse_config`). Nothing here knows TrainConfig: it works for any dataclass of options.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
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
    return from_dict(cls, flag_values(cls, args))


def flag_values(cls: type, args: argparse.Namespace, names: set[str] | None = None) -> dict[str, Any]:
    """The parsed flags of `cls`'s options (only `names` when given), by option name, lists split at commas."""
    data = {}
    for f, hint, _ in _options(cls, cls()):
        if names is not None and f.name not in names:
            continue
        value = getattr(args, f.name)
        if typing.get_origin(hint) is list and isinstance(value, str):
            value = _split(value)
        data[f.name] = value
    return data


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests `argv` sets explicitly (even to their default): argv parsed again with every default suppressed."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """--config FILE: a YAML or JSON file of options that the flags given beside it override (`parse_config`)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file setting any option below by its name (a nested config's options at the "
                        "top level or under its field, e.g. adapter:); flags given on the command line override it")


def parse_config(parser: argparse.ArgumentParser, cls: type[Config], argv: list[str] | None = None) -> Config:
    """`cls` from its defaults, then the --config file if given, then the flags given on the command line.

    A flag overrides the file only when it is on the command line, even when it repeats its default.
    A bad file is one parser.error line (exit 2).
    """
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return from_flags(cls, args)
    try:
        data = read_config_file(cls, path)
    except ValueError as e:
        parser.error(str(e))
    data.update(flag_values(cls, args, given_flags(parser, argv)))
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


# --- config files --------------------------------------------------------------------------------
def _yaml_loader() -> type:
    """yaml.SafeLoader reading numbers and booleans as YAML 1.2 and JSON do: 1e-4 a number, on/off/yes/no strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {  # PyYAML's YAML 1.1 reads `on` as true and wants 1.0e-4 for a float
        first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    exponent = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    return Loader


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a .json or YAML (any other suffix) file holds; ValueError in one line when it holds none."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--config {path} {'is a folder' if file.is_dir() else 'does not exist'}; pass a YAML or JSON file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); fix the file") from None
    else:
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise ValueError(f"{path} is not valid YAML ({where}{getattr(e, 'problem', None) or e}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a mapping of option: value")
    return data


def read_config_file(cls: type, path: str | Path) -> dict[str, Any]:
    """The options a config file sets for `cls`, flat (one key per option), each checked against its field's type."""
    flat = _flatten(cls, load_config_file(path), str(path))
    leaves = _leaves(cls)
    return {name: _checked(name, leaves[name], value, str(path)) for name, value in flat.items()}


def _flatten(cls: type, data: Mapping[str, Any], source: str, under: str = "") -> dict[str, Any]:
    """A file's mapping with nested configs' sections lifted to the top; unknown, shadowed or repeated keys refused."""
    out: dict[str, Any] = {}
    where = f" under '{under}'" if under else ""
    for key, value in current_names(cls, data).items():  # a field's former name reads as the field
        field = next((f for f in dataclasses.fields(cls) if f.name == key), None)
        nested = _nested_class(cls, field) if field is not None else None
        if nested is not None:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: '{key}' must be a mapping of its options, not {value!r}")
            items = _flatten(nested, value, source, f"{under}.{key}" if under else key)
            shadowed = sorted(set(items) & _own_names(cls))
            if shadowed:
                raise ValueError(f"{source}: '{shadowed[0]}' under '{key}' is the top-level '{shadowed[0]}'; set it there")
        elif not isinstance(key, str) or key not in _all_names(cls):
            close = difflib.get_close_matches(str(key), sorted(_leaves(cls)), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "the keys are the options' names (see --help)"
            raise ValueError(f"unknown key '{key}'{where} in {source}; {hint}")
        else:
            items = {key: value}
        for name, item in items.items():
            if name in out:
                raise ValueError(f"{source}: '{name}' is set twice (at the top level and under a section); keep one")
            out[name] = item
    return out


def _leaves(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """(field, type) of every option by name, nested configs' included (an outer field wins a shared name)."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        nested = _nested_class(cls, f)
        if nested is None:
            out[f.name] = (f, hints[f.name])
        else:
            out.update({k: v for k, v in _leaves(nested).items() if k not in _own_names(cls)})
    return out


def _checked(name: str, leaf: tuple[dataclasses.Field, Any], value: Any, source: str) -> Any:
    """`value` as the option's type (an int is a float too; a list also as "a, b"), or ValueError naming both."""
    f, hint = leaf
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    optional = union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if union else hint
    if value is None and optional:
        return None
    ok, what = False, getattr(base, "__name__", str(base))
    if base is bool:
        ok, what = isinstance(value, bool), "true or false"
    elif base is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif base is float:
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif base is str:
        ok, what = isinstance(value, str), "a string"
    elif typing.get_origin(base) is list:
        value = _split(value) if isinstance(value, str) else value
        ok, what = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    if not ok:
        null = " or null" if optional else ""
        raise ValueError(f"{source}: '{name}' must be {what}{null}, not {value!r} ({type(value).__name__})")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{source}: '{name}' is {value!r}; choose one of {', '.join(choices)}")
    return value


def file_dict(config: Any, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config as a config file holds it: nested configs as sections, without the fields an outer one shadows."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in leave_out:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = {k: v for k, v in file_dict(value).items() if k not in _own_names(type(config))}
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def to_yaml(config: Any, header: str = "", leave_out: tuple[str, ...] = ()) -> str:
    """A YAML config file `read_config_file` reads back to `config` (`header`: comment lines on top)."""
    import yaml

    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(file_dict(config, leave_out), sort_keys=False, default_flow_style=False)
