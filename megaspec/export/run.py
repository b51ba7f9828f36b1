"""A finished run folder as export sees it: its base model, tokenizer and adapter, detached from any model.

The adapter is rebuilt on stand-in linears that carry only the layer shapes ("frames"), so an
export never loads the base model just to read the update; methods whose update reads the
frozen weight (SMoA's anchors) get that one layer's weight attached while it is processed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.adapters import Adapter
from megaspec.config import AdapterConfig, current_names
from megaspec.distributed.comm import rank
from megaspec.model import CONFIG_NAME, LAYERS_NAME, WEIGHTS_NAME, adapters_of, load_adapter


class ExportError(ValueError):
    """Bad input to an export (missing run, adapter or base files): one line for the user."""


@dataclass
class Run:
    """The parts of a run folder an export needs."""

    path: Path
    train_config: dict[str, Any]
    adapter_dir: Path
    adapter_config: AdapterConfig
    model: str  # the run's --model, or the embedded tiny LLaMA's folder when it had none
    layers: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> str:
        """The run's --tokenizer, or the base model's own."""
        return str(self.train_config.get("tokenizer") or self.model)

    @property
    def quantize(self) -> str:
        """How the run loaded its base: 'none' or a bitsandbytes mode (train_config 'quantize', megaspec.quant)."""
        return str(self.train_config.get("quantize") or "none")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the run computed in: bf16 if its resolved ds_config.json enabled bf16, else fp32."""
        ds_config = self.path / "ds_config.json"
        bf16 = json.loads(ds_config.read_text()).get("bf16", {}).get("enabled") if ds_config.is_file() else False
        return torch.bfloat16 if bf16 is True else torch.float32


def open_run(run_dir: str | Path, adapter: str | Path | None = None) -> Run:
    """Read a run folder (and optionally another adapter folder, e.g. a checkpoint's); ExportError if unusable.

    Collective when torch.distributed is initialised (embedded_base() builds or waits for the embedded base).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ExportError(f"run folder {path} does not exist")
    config_file = path / "train_config.json"
    if not config_file.is_file():
        raise ExportError(f"{path} is not a run folder: it has no train_config.json")
    adapter_dir = adapter_folder(path, adapter)
    if not (adapter_dir / WEIGHTS_NAME).is_file():
        raise ExportError(f"no adapter in {adapter_dir}: {WEIGHTS_NAME} is missing{_unfinished_hint(path, adapter)}")
    for name in (CONFIG_NAME, LAYERS_NAME):
        if not (adapter_dir / name).is_file():
            raise ExportError(f"adapter folder {adapter_dir} has no {name}")
    train_config = current_names(AdapterConfig, read_json(config_file, "restore it from the run or rewrite it"))
    layers = read_json(adapter_dir / LAYERS_NAME, "re-save the adapter")
    check_adapter_file(adapter_dir / WEIGHTS_NAME, layers)
    try:
        adapter_config = AdapterConfig.load(adapter_dir)
    except (ValueError, TypeError) as e:  # bad JSON, unknown keys, wrong field types
        raise ExportError(f"{adapter_dir / CONFIG_NAME} is not a usable adapter config ({_first_line(e)}); re-save the adapter") from None
    if train_config.get("model"):
        model = base_folder(path, train_config)
    else:
        from megaspec.train.embedded import embedded_base

        model = str(embedded_base())
    return Run(
        path=path,
        train_config=train_config,
        adapter_dir=adapter_dir,
        adapter_config=adapter_config,
        model=model,
        layers=layers,
    )


def adapter_folder(run_dir: Path, adapter: str | Path | None) -> Path:
    """The adapter folder to use: --adapter (a checkpoint folder means its adapter/), else the run's adapter/."""
    if adapter is None:
        return run_dir / "adapter"
    folder = Path(adapter)
    if not (folder / WEIGHTS_NAME).is_file() and (folder / "adapter" / WEIGHTS_NAME).is_file():
        return folder / "adapter"  # checkpoints/step-N: its adapter/ is what save_adapter wrote
    return folder


def _unfinished_hint(run_dir: Path, adapter: str | Path | None) -> str:
    """For a run without adapter/ (stopped or still training): the --adapter that names its latest checkpoint."""
    if adapter is not None:
        return ""
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    if not steps:
        return " (unfinished run without checkpoints?)"
    return f" (an unfinished run: pass --adapter {steps[-1]}, its latest checkpoint)"


def base_folder(run_dir: Path, train_config: dict[str, Any]) -> str:
    """The base the run trained on: its --model, or for a .gguf its converted HF folder (recorded, else converted again)."""
    from megaspec.gguf import is_gguf, resolve_model

    model = str(train_config["model"])
    if not is_gguf(model):
        return model
    recorded = train_config.get("base_folder")
    if recorded and (Path(recorded) / "config.json").is_file():
        return str(recorded)
    ds_config = run_dir / "ds_config.json"
    raw = read_json(ds_config, "restore it from the run") if ds_config.is_file() else {}
    dtype = torch.bfloat16 if raw.get("bf16", {}).get("enabled") is True else torch.float32  # as Run.dtype
    try:
        return str(resolve_model(model, dtype))
    except ValueError as e:  # ConfigError: the .gguf is gone or unreadable
        raise ExportError(f"the run's base {model} cannot be used ({_first_line(e)}); restore the .gguf file") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_json(file: Path, fix: str) -> dict[str, Any]:
    """The JSON object in a run's file, or one ExportError naming the file and the fix."""
    try:
        value = json.loads(file.read_text())
    except UnicodeDecodeError:
        raise ExportError(f"{file} is not a text file; {fix}") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{file} must hold a JSON object, not {type(value).__name__}; {fix}")
    return value


def check_adapter_file(file: Path, layers: dict[str, Any]) -> None:
    """The adapter's safetensors header is whole and names every tensor adapter_layers.json lists (a truncated copy fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ExportError(f"adapter file {file} is truncated or corrupt ({_first_line(e)}); re-save the adapter "
                          "or pass --adapter RUN/checkpoints/step-N/adapter") from None
    for layer, info in layers.items():
        for key in (*info.get("plan", ()), *info.get("params", ())):
            if f"{layer}.{key}" not in names:
                raise ExportError(f"adapter file {file} has no tensor {layer}.{key} that {LAYERS_NAME} lists; re-save the adapter")


class Frame(nn.Module):
    """Stands in for a frozen linear: its shape, and its dense weight while one is attached."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = None


def detached_adapters(run: Run) -> dict[str, Adapter]:
    """The run's adapters, loaded (plans and parameters) onto frames named as in the base model."""
    root = nn.Module()
    for name, info in run.layers.items():
        parent = root
        *path, child = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(child, Frame(*info["shape"]))
    load_adapter(root, run.adapter_dir)
    return {name: adapter.eval() for name, adapter in adapters_of(root).items()}


@contextlib.contextmanager
def attached(adapter: Adapter, weight: torch.Tensor | None) -> Iterator[Adapter]:
    """Within the block the adapter's frame holds `weight` (dense fp32), for updates that read W0."""
    frame = adapter.base
    if weight is None or not isinstance(frame, Frame):
        yield adapter
        return
    empty = frame.weight
    frame.weight = nn.Parameter(weight, requires_grad=False)
    try:
        yield adapter
    finally:
        frame.weight = empty


def update_rows(adapter: Adapter, weight: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """row_ids -> rows of dW in float64 on CPU (scale included): the reference for merging and factoring.

    The adapter's own float64 path where it has one (Adapter.float64_rows: SSH, FourierFT), else a
    float64 copy of the adapter, with `weight` (W0, for updates that read it) attached.
    """
    exact = adapter.float64_rows()
    if exact is not None:
        return exact
    reference = copy.deepcopy(adapter).double()

    def compute(ids: torch.Tensor) -> torch.Tensor:
        with attached(reference, weight), torch.no_grad():
            return reference.delta_weight(ids.to(reference.device)).double().cpu()

    return compute


def load_base(run: Run, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The run's base model as training loaded it (its dtype; bitsandbytes-quantized if the run was)."""
    from transformers import AutoModelForCausalLM

    from megaspec.quant import bnb_config, prepare_quantized

    dtype = dtype or run.dtype
    quantization = bnb_config(run.quantize, dtype)
    kwargs = {"device_map": str(device)} if quantization is not None else {}
    model = AutoModelForCausalLM.from_pretrained(run.model, dtype=dtype, quantization_config=quantization, **kwargs)
    if quantization is not None:
        prepare_quantized(model)
    else:
        model.to(device)
    return model.eval()


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing --out folder unless asked to."""
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    check_writable(out)


def check_writable(out: Path) -> None:
    """Create and remove a folder where `out` will be staged, so a read-only --out fails before any work."""
    folder = out.absolute().parent
    while not folder.exists():  # staged() creates the missing parents
        folder = folder.parent
    if not folder.is_dir():
        raise ExportError(f"--out {out}: {folder} is a file, not a folder; pass another --out")
    probe = folder / f".{out.name}.probe-{os.getpid()}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write in {folder} ({e.strerror}); pass an --out on a writable disk") from None


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path | None]:
    """A hidden temp folder beside `out` on rank 0 (None elsewhere), renamed to `out` only on success."""
    if rank() != 0:
        yield None
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _readable(folder: Path) -> None:
    """Give every file the umask's usual mode: safetensors writes 0600 files, which a server under another uid cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
