"""Use a finished run: a merged HF checkpoint, a peft adapter, or the native adapter with a model card.

    export("runs/X", "out/merged", "merged")          # base + update, sharded safetensors
    export("runs/X", "out/peft", "peft")              # PeftModel.from_pretrained(base, "out/peft")
    export("runs/X", "out/peft16", "peft", lora_rank=16)   # truncated LoRA (vLLM's max_lora_rank)
    export("runs/X", "out/native", "megaspec")        # the adapter folder + model_card.json

Every format is written into a hidden temp folder beside `out` and renamed at the end, so a failed
export leaves nothing at `out`. Collective when torch.distributed is initialised (every rank calls
it; rank 0 writes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megaspec.distributed.comm import rank as process_rank
from megaspec.export.merged import DEFAULT_SHARD_BYTES, write_merged
from megaspec.export.native import export_native
from megaspec.export.peft_format import export_peft
from megaspec.export.run import ExportError, Run, check_out, detached_adapters, load_base, open_run, staged
from megaspec.export.sources import CheckpointSource, ModelSource, Source, local_model_folder

FORMATS = ("merged", "peft", "megaspec")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_source(run: Run) -> Source:
    """The base's weights as the run trained against them (ModelSource for quantized runs).

    The safetensors files are read directly; a quantized run (or a base without safetensors) is
    loaded as training loaded it, and its bitsandbytes linears are dequantized layer by layer.
    """
    if run.quantize == "none":
        folder = local_model_folder(run.model)
        try:
            return CheckpointSource(folder)
        except ExportError:
            pass
    return ModelSource(load_base(run))


MERGE_BASES = ("original", "dequantized")


def merge_sources(run: Run, adapters: dict[str, Any], merge_base: str | None) -> tuple[Source, Source | None, str]:
    """The base a merged export adds the update to, the trained-against weights if an update reads W0, and the choice.

    A run on a bitsandbytes base trained against dequantized 4/8-bit weights. `original` merges
    onto the checkpoint's own weights, as QLoRA users merge (the default when that checkpoint's
    safetensors are at hand); `dequantized` onto the weights the run saw. Unquantized runs have
    one base, and both names mean it.
    """
    if merge_base is not None and merge_base not in MERGE_BASES:
        raise ExportError(f"unknown --merge_base {merge_base!r}; choose one of {', '.join(MERGE_BASES)}")
    if run.quantize == "none":
        return open_source(run), None, "original"
    if merge_base == "dequantized":
        return open_source(run), None, "dequantized"
    try:
        original = CheckpointSource(local_model_folder(run.model))
    except ExportError as e:
        if merge_base == "original":
            raise ExportError(f"--merge_base original needs the base's safetensors: {e}; pass --merge_base dequantized") from e
        return open_source(run), None, "dequantized"
    reads = any(adapter.update_reads_weight for adapter in adapters.values())
    return original, (open_source(run) if reads else None), "original"


def write_model_files(run: Run, folder: Path, dtype: torch.dtype | None) -> None:
    """config.json (dtype set, quantization removed), generation_config.json and the tokenizer."""
    from transformers import AutoConfig, GenerationConfig

    from megaspec.train.data import load_tokenizer

    config = AutoConfig.from_pretrained(run.model)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(folder))
    try:
        GenerationConfig.from_pretrained(run.model).save_pretrained(str(folder))
    except OSError:
        pass  # the base has no generation_config.json
    load_tokenizer(run.tokenizer).save_pretrained(str(folder))


def _say(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None and process_rank() == 0:
        log(text)


def export(
    run_dir: str | Path,
    out: str | Path,
    format: str,
    lora_rank: int | None = None,
    dtype: str | None = None,
    adapter: str | Path | None = None,
    as_lora: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    log: Callable[[str], None] | None = print,
    merge_base: str | None = None,
) -> dict[str, Any]:
    """Export a run in `format` (merged | peft | megaspec) to `out`; returns a report (rank 0's is complete).

    merge_base (merged, quantized runs): "original" or "dequantized" weights under the update
    (merge_sources); None picks original when the base checkpoint has safetensors.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if lora_rank is not None and (format != "peft" or lora_rank < 1):
        raise ExportError("--lora_rank takes a positive rank and applies to --format peft only")
    if merge_base is not None and format != "merged":
        raise ExportError("--merge_base applies to --format merged only (a peft or megaspec adapter carries no base)")
    out = Path(out)
    check_out(out, overwrite)
    run = open_run(run_dir, adapter)
    adapters = detached_adapters(run)
    torch_dtype = DTYPES[dtype] if dtype else (torch.float32 if run.quantize != "none" else None)
    start = time.perf_counter()
    with staged(out) as folder:
        if format == "merged":
            base, trained, chosen = merge_sources(run, adapters, merge_base)
            report = write_merged(base, adapters, folder, torch_dtype, max_shard_bytes, trained=trained)
            report.update(merge_base=chosen, quantized=run.quantize != "none")
            if folder is not None:
                write_model_files(run, folder, torch_dtype)
        elif format == "peft":
            report = export_peft(run, adapters, folder, lora_rank, as_lora, torch_dtype or torch.float32, lambda: open_source(run))
        else:
            report = export_native(run, folder) if folder is not None else {}
    report.update(format=format, out=str(out), seconds=time.perf_counter() - start, method=run.adapter_config.method)
    _say(log, describe(report))
    return report


def layer_order(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key in the model's layer order: numeric parts compare as numbers (layers.2 before layers.10)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def describe(report: dict[str, Any]) -> str:
    """A human summary of an export report: one line per adapted layer in layer order, then the totals."""
    lines = []
    for name, layer in sorted(report.get("layers", {}).items(), key=lambda item: layer_order(item[0])):
        lines.append(
            f"  {name:<44} exact rank {layer['exact_rank']:>5} ({layer['how']:<10}) -> r {layer['rank']:>5}"
            f"   residual ||dW - BA||/||dW|| = {layer['residual']:.2e}"
        )
    for name, value in sorted(report.get("relative_update", {}).items(), key=lambda item: layer_order(item[0])):
        lines.append(f"  {name:<44} ||dW||/||W0|| = {value:.3e}")
    head = f"exported {report['method']} run as {report['format']}"
    if report.get("merge_base") == "original" and report.get("quantized"):
        head += " onto the original base weights"
    elif report.get("merge_base") == "dequantized":
        head += " onto the dequantized base weights"
    if "peft_type" in report:
        head += f" ({report['peft_type']})"
    if "shards" in report:
        head += f": {report['shards']} shard(s), {report['bytes'] / 1e6:.1f} MB"
    elif "bytes" in report:
        head += f": {report['bytes'] / 1e3:.1f} kB"
    return "\n".join([*lines, f"{head} -> {report['out']} in {report['seconds']:.1f} s"])


__all__ = ["DTYPES", "FORMATS", "ExportError", "describe", "export", "open_run"]
