"""Quantize on load under ZeRO-3: each rank keeps only its share of the packed frozen base.

transformers loads a bitsandbytes model whole on every rank (it skips zero.Init for quantized
models), ~35 GB per rank for 70B nf4. Here the model is built on the meta device with the target
linears already replaced by bnb layers (transformers' own replacement); every parameter is made
a ZeRO-3 parameter with its final packed shape and dtype; then the safetensors checkpoint is read
tensor by tensor, in row chunks, each chunk memory-mapped on its own so its pages leave the
process with it. A frozen linear's chunk is quantized on the rank exactly as bitsandbytes
quantizes the whole weight (its blockwise and row-wise quantizers are per block / per row, and
chunks are cut on block and row boundaries), and only the part inside this rank's ZeRO-3 window
is kept. Other weights (embeddings, norms, lm_head) read only the rows of their window, cast to
the run's dtype. The quantization state (absmax, code tables, int8 row scales) stays whole.

Per rank the load then holds: its 1/N share of the partitioned weights + the whole quantization
state + one chunk's working buffers (CHUNK_ELEMENTS weights, ~20 bytes each while quantizing).

MEGASPEC_QUANT_LOAD=whole (or build_model(..., quant_load="whole")) keeps the old path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.quant import bnb_config
from megaspec.train.dsconfig import ConfigError, zero_stage

LOAD_MODES = ("auto", "stream", "whole")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# weights per chunk read and quantized at once: the quantizer's fp32/int32 temporaries cost ~20 B each
CHUNK_ELEMENTS = 1 << 22


class CheckpointError(ConfigError):
    """The checkpoint cannot be streamed (not safetensors, or a tensor is missing): one line with the fix."""


def load_mode(requested: str | None = None) -> str:
    """The quantized-load mode: the argument, else $MEGASPEC_QUANT_LOAD, else "auto"."""
    mode = requested or os.environ.get("MEGASPEC_QUANT_LOAD", "auto")
    if mode not in LOAD_MODES:
        raise ConfigError(f"MEGASPEC_QUANT_LOAD={mode!r} is not one of {', '.join(LOAD_MODES)}")
    return mode


def streams(model: str, ds_config: dict[str, Any], quantize: str, mode: str | None = None) -> bool:
    """Whether build_model quantizes on load: ZeRO-3, --quantize, a local folder, mode not "whole"."""
    mode = load_mode(mode)
    if quantize == "none" or zero_stage(ds_config) != 3 or mode == "whole":
        return False
    return mode == "stream" or Path(model).expanduser().is_dir()


def check_checkpoint(model: str, ds_config: dict[str, Any], quantize: str) -> None:
    """Before any rank starts: a checkpoint build_model would quantize on load must be safetensors."""
    if streams(model, ds_config, quantize):
        checkpoint_files(model)


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a local HF checkpoint, or one CheckpointError naming the fix."""
    folder = Path(folder).expanduser()
    index, single = folder / INDEX_NAME, folder / SINGLE_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"--model {folder}: {INDEX_NAME} names {file.name}, which is not there; "
                                      "copy the missing shard or re-save the model")
        return files
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    what = f"holds {found[0]}, not safetensors" if found else f"has no {SINGLE_NAME} or {INDEX_NAME}"
    raise CheckpointError(
        f"--model {folder} {what}: quantizing on load under ZeRO-3 reads safetensors; re-save it with "
        "save_pretrained(..., safe_serialization=True), or set MEGASPEC_QUANT_LOAD=whole to load the whole "
        "model on every rank")


def skeleton(folder: str | Path, quantize: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """The model with every parameter on the meta device and bnb linears in place; and its HF quantizer.

    Built as from_pretrained builds a bitsandbytes model (the same module replacement, the same
    dtype), but buffers (RoPE frequencies) are computed for real on the CPU.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import set_quantized_state
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(str(folder))
    quantizer = AutoHfQuantizer.from_config(bnb_config(quantize, dtype))
    with set_quantized_state(), init_empty_weights(include_buffers=False):  # no zero.Init, no allocation
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map=None)
    return model, quantizer


def load_quantized_zero3(folder: str | Path, ds_config: dict[str, Any], quantize: str, dtype: torch.dtype) -> nn.Module:
    """The bnb-quantized base as ZeRO-3 partitioned parameters, read and quantized shard by shard."""
    import deepspeed

    files = checkpoint_files(folder)
    model, quantizer = skeleton(folder, quantize, dtype)
    # as from_pretrained: tied weights (tie_word_embeddings) share the one the checkpoint holds
    model.tie_weights(missing_keys={n for n, _ in model.named_parameters(remove_duplicate=False) if n not in files})
    entries = _entries(model, files)
    init = deepspeed.zero.Init(config_dict_or_path=ds_config)  # its partitioning rules; never entered as a context
    device = init.local_device
    for buffer_module in model.modules():
        for key, buffer in buffer_module.named_buffers(recurse=False):
            buffer_module._buffers[key] = buffer.to(device)
    bnb = _bnb()
    for holders, name in entries:
        param = _zero_param(init, holders, device)
        if isinstance(param, bnb.nn.Params4bit):
            _fill_4bit(param, holders[0][0], files[name], name, dtype, device)
        elif isinstance(param, bnb.nn.Int8Params):
            _fill_int8(param, files[name], name, dtype, device)
        else:
            _fill_plain(param, files[name], name)
        _release_freed_memory()
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model.eval()


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim); a no-op elsewhere.

    The chunk buffers (16 MB fp32 at CHUNK_ELEMENTS) fall under glibc's mmap threshold once it has
    adapted, so they come from the heap, between the shards that stay; without trimming, the freed
    space of every tensor's buffers stays resident (measured: +0.7 GiB on a 0.5B nf4 load).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _bnb() -> Any:
    import bitsandbytes

    return bitsandbytes


def _entries(model: nn.Module, files: dict[str, Path]) -> list[tuple[list[tuple[nn.Module, str]], str]]:
    """([(module, key), ...] holding one distinct parameter, its checkpoint name); tied ones once, by any alias."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    aliases: dict[int, list[str]] = {}
    for prefix, module in model.named_modules():
        for key, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((module, key))
            aliases.setdefault(id(param), []).append(f"{prefix}.{key}" if prefix else key)
    entries = []
    for pid, names in aliases.items():
        name = next((n for n in names if n in files), None)
        if name is None:
            where = next(iter(files.values())).parent if files else "the checkpoint"
            raise CheckpointError(f"--model {where}: tensor {names[0]} is missing from its safetensors files; "
                                  "the checkpoint does not match its config.json (re-save the model with save_pretrained)")
        entries.append((holders[pid], name))
    return entries


def _zero_param(init: Any, holders: list[tuple[nn.Module, str]], device: torch.device) -> nn.Parameter:
    """A real parameter of the placeholder's final (packed) shape and dtype, partitioned by `init`, set on its modules.

    Its full-size data is an untouched torch.empty in host memory, whose pages are never backed by
    memory: DeepSpeed's own partitioning copies only this rank's window of it into the shard it
    allocates where the config says (GPU, CPU offload, pinned, hpZ's secondary copy), then the
    emptied data moves to the device, as ZeRO-3 keeps it. Skipped on purpose: zero.Init's broadcast
    of every parameter from rank 0 (_zero_init_param), which would send the whole model.
    """
    bnb = _bnb()
    module, key = holders[0]
    placeholder = getattr(module, key)
    if isinstance(placeholder, bnb.nn.Params4bit):
        storage = placeholder.quant_storage
        packed = (math.prod(placeholder.shape) + 1) // 2 // storage.itemsize  # bnb's packed length
        param = bnb.nn.Params4bit(torch.empty((packed, 1), dtype=storage), requires_grad=False,
                                  blocksize=placeholder.blocksize, compress_statistics=placeholder.compress_statistics,
                                  quant_type=placeholder.quant_type, quant_storage=storage, module=module, bnb_quantized=True)
    elif isinstance(placeholder, bnb.nn.Int8Params):
        param = bnb.nn.Int8Params(torch.empty(placeholder.shape, dtype=torch.int8), requires_grad=False,
                                  has_fp16_weights=False)
    else:
        param = nn.Parameter(torch.empty(placeholder.shape, dtype=placeholder.dtype), requires_grad=placeholder.requires_grad)
    for holder, holder_key in holders:
        holder._parameters[holder_key] = param
    init._convert_to_deepspeed_param(param)
    param.partition()
    param.data = torch.empty(0, dtype=param.dtype, device=device)  # gathers land on param.device
    return param


def _windows(param: nn.Parameter) -> list[tuple[int, torch.Tensor]]:
    """(flat start, shard) of each copy of the parameter this rank keeps: its ZeRO-3 partition (and hpZ's)."""
    windows = [(param.ds_tensor.ds_numel * param.ds_zero_partition_rank, param.ds_tensor)]
    secondary = getattr(param, "ds_secondary_tensor", None)
    if secondary is not None:
        import deepspeed.comm as dist

        group_rank = dist.get_rank(group=param.ds_zero_param_process_group)
        windows.append((secondary.ds_numel * group_rank, secondary))
    for _, shard in windows:
        if getattr(shard, "final_location", None) is not None:  # NVMe: the shard is not in memory
            raise ConfigError("quantizing on load cannot write NVMe-offloaded parameters; set MEGASPEC_QUANT_LOAD=whole")
    return windows


def _keep(windows: list[tuple[int, torch.Tensor]], start: int, flat: torch.Tensor, numel: int) -> None:
    """Copy the part of `flat` (flat elements start.. of the parameter) inside each window into it."""
    for window_start, shard in windows:
        lo = max(start, window_start)
        hi = min(start + flat.numel(), window_start + shard.numel(), numel)
        if lo < hi:
            shard.view(-1)[lo - window_start:hi - window_start].copy_(flat[lo - start:hi - start])


@contextlib.contextmanager
def _rows(file: Path, name: str, begin: int, end: int) -> Iterator[torch.Tensor]:
    """Rows begin..end of a checkpoint tensor, memory-mapped for the block only (its pages leave with it)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        view = f.get_slice(name)[begin:end] if f.get_slice(name).get_shape() else f.get_tensor(name).reshape(1)
    try:
        yield view
    finally:
        del view


def _shape(file: Path, name: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.get_slice(name).get_shape())


def _row_chunks(rows: int, cols: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """(begin, end) row ranges of about CHUNK_ELEMENTS weights, each starting on a multiple of `align` weights."""
    step_align = align // math.gcd(cols, align)
    step = max(step_align, CHUNK_ELEMENTS // max(cols, 1) // step_align * step_align)
    for begin in range(0, rows, step):
        yield begin, min(rows, begin + step)


def _fill_plain(param: nn.Parameter, file: Path, name: str) -> None:
    """An unquantized weight: read only the rows that overlap this rank's windows, cast to the run's dtype."""
    shape = _shape(file, name)
    if shape != list(param.ds_shape):
        raise CheckpointError(f"{file}: tensor {name} has shape {shape}, config.json says {list(param.ds_shape)}")
    numel = param.ds_numel
    cols = max(1, math.prod(shape[1:]))
    step = max(1, CHUNK_ELEMENTS // cols)
    for window_start, shard in _windows(param):
        lo, hi = window_start, min(window_start + shard.numel(), numel)
        if lo >= hi:
            continue  # a window wholly in the padding of the last partition
        first, last = lo // cols, -(-hi // cols)
        for begin in range(first, last, step):
            with _rows(file, name, begin, min(last, begin + step)) as view:
                _keep([(window_start, shard)], begin * cols, view.reshape(-1), numel)


def _fill_4bit(param: nn.Parameter, module: nn.Module, file: Path, name: str, dtype: torch.dtype, device: torch.device) -> None:
    """A Linear4bit weight quantized chunk by chunk as bnb quantizes it whole; this rank keeps its packed window.

    bitsandbytes' 4-bit quantizer packs each block of `blocksize` weights independently (one absmax
    each), two codes per byte, so chunks cut at multiples of lcm(blocksize, 2 * storage bytes)
    weights give exactly the packed bytes and absmax of the whole weight. Double quant
    (compress_statistics) is then applied to the whole absmax, as bnb.functional.quantize_4bit does.
    """
    import bitsandbytes.functional as bnbf

    rows, cols = _checked_linear_shape(file, name, module)
    storage, blocksize = param.quant_storage, param.blocksize
    per_element = 2 * storage.itemsize  # 4-bit codes per packed element
    align = math.lcm(blocksize, per_element)
    windows, numel = _windows(param), param.ds_numel
    absmax = []
    for begin, end in _row_chunks(rows, cols, align):
        with _rows(file, name, begin, end) as view:
            weight = view.to(device=device, dtype=dtype)  # from_pretrained casts to the run's dtype first
        packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=False,
                                           quant_type=param.quant_type, quant_storage=storage)
        del weight
        _keep(windows, begin * cols // per_element, packed.view(-1), numel)
        absmax.append(state.absmax)
    state = _quant_state_4bit(torch.cat(absmax), (rows, cols), dtype, param, device)
    param.quant_state = state
    module.quant_state = state


def _quant_state_4bit(absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, param: Any, device: torch.device) -> Any:
    """The QuantState bnb.functional.quantize_4bit builds from the whole weight's absmax (double quant included)."""
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type(param.quant_type, device=device)
    common = dict(shape=torch.Size(shape), dtype=dtype, blocksize=param.blocksize, code=code, quant_type=param.quant_type)
    if not param.compress_statistics:
        return bnbf.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    return bnbf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def _fill_int8(param: nn.Parameter, file: Path, name: str, dtype: torch.dtype, device: torch.device) -> None:
    """A Linear8bitLt weight quantized row chunk by row chunk (LLM.int8() scales each row alone); window kept."""
    import bitsandbytes.functional as bnbf

    rows, cols = _checked_linear_shape(file, name, None, param)
    windows, numel = _windows(param), param.ds_numel
    scales = []
    for begin, end in _row_chunks(rows, cols):
        with _rows(file, name, begin, end) as view:
            # from_pretrained casts to the run's dtype, then Int8Params to fp16 before quantizing
            weight = view.to(device=device, dtype=dtype).to(torch.float16)
        codes, scale, _ = bnbf.int8_vectorwise_quant(weight)
        del weight
        _keep(windows, begin * cols, codes.view(-1), numel)
        scales.append(scale)
    param.SCB = torch.cat(scales)
    param.CB = None  # the codes live in the ZeRO-3 shard; prepare_quantized moves SCB into the layer's state


def _checked_linear_shape(file: Path, name: str, module: nn.Module | None, param: Any = None) -> tuple[int, int]:
    """(out, in) of a checkpoint linear weight, which must match the layer."""
    shape = _shape(file, name)
    want = [int(module.out_features), int(module.in_features)] if module is not None else list(param.ds_shape)
    if shape != want:
        raise CheckpointError(f"{file}: tensor {name} has shape {shape}, config.json says {want}")
    return shape[0], shape[1]
