"""Per-rank peak memory and time of loading the frozen base under ZeRO-3: whole load vs quantize on load.

A synthetic LLaMA checkpoint (random bf16 weights, sharded safetensors) is written once, then loaded
by build_model on 1 and 2 CPU ranks (gloo, one thread each), each load in fresh processes:

- bf16: transformers' zero.Init load (the reference: partitioned as it is read);
- nf4 / int8, "whole": the old path, from_pretrained with bitsandbytes on every rank;
- nf4 / int8, "stream": megaspec.quant_load, quantize on load, each rank keeping its shard.

Per rank: peak = VmHWM - VmRSS just before build_model (VmHWM reset with /proc/self/clear_refs "5",
after loading a one-layer copy of the model the same way, so imports and caches are already paid);
"held" = bytes of the tensors the rank keeps (ZeRO-3 shards or whole data, quantization state,
buffers), counted from their storages. The bound of quantize on load (issue 16): the rank's
ZeRO-3 shards + the whole quantization state + the largest checkpoint tensor in its stored dtype.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from megaspec.benchmarks.common import run_rank_processes, table
from megaspec.benchmarks.selection import peak_bytes, reset_peak, rss_bytes

# ~0.55B parameters (1.1 GB in bf16): LLaMA proportions, GQA, a 32k vocabulary
SYNTHETIC = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)
PRECISIONS = ("bf16", "nf4", "int8")
SHARD_BYTES = 256 << 20


def write_checkpoint(folder: Path, config: dict[str, Any], dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES) -> Path:
    """A random LLaMA of `config` saved as sharded safetensors + index + config.json, one tensor in memory at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from megaspec.benchmarks.common import meta_llama

    folder.mkdir(parents=True, exist_ok=True)
    llama = LlamaConfig(**config)
    generator = torch.Generator().manual_seed(0)
    shapes = [(name, tuple(p.shape)) for name, p in meta_llama(llama).named_parameters()]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, shape in shapes:
        tensor = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
        tensor = tensor.to(dtype)
        if size and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    shards.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    llama.dtype = dtype
    llama.save_pretrained(folder)
    return folder


def checkpoint_stats(folder: Path) -> dict[str, int]:
    """Parameters, bytes, largest tensor bytes and shard count of a safetensors checkpoint (headers only)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    params = total = largest = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                numel = 1
                for dim in part.get_shape():
                    numel *= dim
                nbytes = numel * {"BF16": 2, "F16": 2, "F32": 4}[part.get_dtype()]
                params, total, largest = params + numel, total + nbytes, max(largest, nbytes)
    return {"params": params, "bytes": total, "largest_tensor": largest, "shards": len(files)}


def held_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the weights a rank keeps (megaspec.quant.frozen_bytes of every parameter): shards, whole data, quant state."""
    from megaspec.quant import frozen_bytes

    counts = frozen_bytes(model.requires_grad_(False))  # at load every weight of the base is frozen
    return {"shards": counts["partition"], "whole": counts["plain"] + counts["packed"], "quant_state": counts["quant_state"],
            "total": counts["total"]}


def ds_config(hidden_size: int) -> dict[str, Any]:
    """The repo's zero3.json with its "auto" values resolved, in bf16 (the run dtype of a GPU job)."""
    from megaspec.train.dsconfig import read_ds_config, resolve_ds_config

    raw = read_ds_config(Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json")
    config = resolve_ds_config(raw, lr=1e-4, max_steps=1, warmup_steps=1, hidden_size=hidden_size)
    return {**config, "bf16": {"enabled": True}}


def _load(folder: str, precision: str, mode: str, hidden: int) -> torch.nn.Module:
    from megaspec.train.loop import build_model

    quantize = "none" if precision == "bf16" else precision
    return build_model(folder, ds_config(hidden), quantize, quant_load=None if precision == "bf16" else mode)


def _rank_main(spec_path: str) -> None:
    """One rank: warm up on the one-layer copy, then load the checkpoint and write peak, time and bytes."""
    import deepspeed

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()
    warm = _load(spec["warmup"], spec["precision"], spec["mode"], spec["hidden"])
    del warm
    gc.collect()
    torch.distributed.barrier()
    reset_peak()
    before = rss_bytes()
    start = time.perf_counter()
    model = _load(spec["folder"], spec["precision"], spec["mode"], spec["hidden"])
    seconds = time.perf_counter() - start
    peak = peak_bytes() - before
    result = {"rank": rank, "load_s": seconds, "peak": peak, "held": held_bytes(model), "rss_after": rss_bytes() - before}
    Path(spec["out"]).joinpath(f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(folder: Path, warmup: Path, precision: str, mode: str, world_size: int, hidden: int, timeout: float = 1800.0) -> list[dict[str, Any]]:
    """build_model of `folder` on `world_size` fresh CPU ranks; one result per rank."""
    spec = {"folder": str(folder), "warmup": str(warmup), "precision": precision, "mode": mode, "hidden": hidden}
    return run_rank_processes("megaspec.benchmarks.load", spec, world_size, f"{precision} {mode} load on {world_size} ranks", timeout)


def run(world_sizes: tuple[int, ...] = (1, 2), precisions: tuple[str, ...] = PRECISIONS, modes: tuple[str, ...] = ("whole", "stream"),
        config: dict[str, Any] | None = None, folder: str | None = None) -> dict[str, Any]:
    """Write (or reuse) the synthetic checkpoint and measure every (precision, path, world size); one row per rank."""
    config = {**SYNTHETIC, **(config or {})}
    with tempfile.TemporaryDirectory(prefix="megaspec-ckpt-") as tmp:
        root = Path(folder) if folder else Path(tmp)
        model_dir, warm_dir = root / "model", root / "warmup"
        if not (model_dir / "model.safetensors.index.json").is_file():
            write_checkpoint(model_dir, config)
        if not (warm_dir / "model.safetensors.index.json").is_file():
            write_checkpoint(warm_dir, {**config, "num_hidden_layers": 1})
        stats = checkpoint_stats(model_dir)
        rows = []
        for precision in precisions:
            for mode in (("zero.Init",) if precision == "bf16" else modes):
                for world in world_sizes:
                    for r in measure(model_dir, warm_dir, precision, mode, world, config["hidden_size"]):
                        held = r["held"]
                        bound = held["shards"] + held["quant_state"] + stats["largest_tensor"] if mode == "stream" else None
                        rows.append({"precision": precision, "path": mode, "world_size": world, "rank": r["rank"],
                                     "load_s": r["load_s"], "peak": r["peak"], "held": held["total"],
                                     "shards": held["shards"], "whole": held["whole"], "quant_state": held["quant_state"],
                                     "bound": bound, "peak_over_bound": r["peak"] / bound if bound else None})
    return {"checkpoint": {**stats, "config": config}, "rows": rows}


COLUMNS = [("precision", "precision", ""), ("path", "path", ""), ("world_size", "W", "d"), ("rank", "rank", "d"),
           ("load_s", "load s", ".1f"), ("peak", "peak/rank", "bytes"), ("held", "held after", "bytes"),
           ("whole", "of which whole", "bytes"), ("quant_state", "quant state", "bytes"), ("bound", "bound", "bytes"),
           ("peak_over_bound", "peak/bound", ".3f")]


def format_table(result: dict[str, Any]) -> str:
    """The checkpoint line, then one row per rank."""
    stats = result["checkpoint"]
    head = (f"checkpoint: {stats['params'] / 1e9:.3f}B params, {stats['bytes'] / 2**30:.2f} GiB bf16 in {stats['shards']} shards, "
            f"largest tensor {stats['largest_tensor'] / 2**20:.1f} MiB")
    return head + "\n" + table(result["rows"], COLUMNS)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
