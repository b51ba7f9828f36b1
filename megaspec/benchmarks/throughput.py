"""Training throughput and MFU of a LLaMA-3.1-8B-shaped model on one GPU: frozen only vs SSH vs LoRA.

Random bf16 weights are built on the device (nothing is downloaded); a step is forward + loss +
backward (+ AdamW on the adapter parameters), plain PyTorch, inputs of random tokens. The frozen
row trains nothing but still back-propagates to the input embeddings (enable_input_require_grads,
as every adapter row does too), so the three rows do the same frozen work.

FLOPs per token, N = parameters of every matmul (decoder projections + lm_head, not embeddings),
L layers, S sequence length, q = heads * head_dim; attention counted non-causal (PaLM, appendix B):

    6N + 12 L S q   the usual convention (as if the weights were trained: forward 2N, backward 4N)
    4N + 12 L S q   a frozen base really does: forward 2N, backward input-gradients 2N, no weight-gradients

MFU = FLOPs per token * tokens/s / peak bf16 dense FLOP/s of the GPU (PEAK_TFLOPS, or --peak-tflops).
With --layers k < 32 the model has k decoder layers; a 1-layer model is timed too, and the per-layer
marginal cost (t_k - t_1) / (k - 1) extrapolates the full depth: t_32 = t_1 + 31 * per-layer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from megaspec.benchmarks.common import PAPER_SETTINGS, Setting, llama_config, table

NO_CUDA = "throughput needs a CUDA GPU; none found"
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
FROZEN = Setting("frozen only", "")
DEFAULT_SETTINGS = [FROZEN, PAPER_SETTINGS["ssh"][0], Setting("lora r=16", "lora", {"rank": 16, "alpha": 32.0})]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a known GPU (None when unknown: pass --peak-tflops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((1e12 * v for k, v in PEAK_TFLOPS.items() if k in name), None)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype` (no fp32 copy of 8B parameters on the way)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(config: Any, setting: Setting, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A random-weight LLaMA on `device` in `dtype`, adapted by `setting` (nothing for the frozen row)."""
    from transformers import LlamaForCausalLM

    from megaspec.adapters import adapter_class
    from megaspec.model import apply_adapters

    torch.manual_seed(0)
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model.requires_grad_(False)
    if setting.method:
        if getattr(adapter_class(setting.method), "needs_calibration", False):
            batch = random_batch(config, 1, 128, device)
            apply_adapters(model, setting.config(), calibration=[batch])
        else:
            apply_adapters(model, setting.config())
        model.to(dtype)  # as DeepSpeed's bf16 engine: adapters in the run's dtype too
    model.enable_input_require_grads()
    return model.train()


def random_batch(config: Any, batch: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids as inputs and labels."""
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    return {"input_ids": ids, "labels": ids}


def matmul_params(model: nn.Module) -> int:
    """N: parameters of every linear (decoder projections, lm_head; adapters' frozen bases included once)."""
    from megaspec.adapters import Adapter

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not isinstance(module, Adapter) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> tuple[float, float | None]:
    """(median seconds per training step, peak allocated bytes or None off CUDA)."""
    device = batch["input_ids"].device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def run(
    layers: int | None = None,
    batch: int = 1,
    seq_len: int = 4096,
    steps: int = 10,
    warmup: int = 3,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    settings: list[Setting] | None = None,
    peak_tflops: float | None = None,
    model: str = "llama-3.1-8b",
    **overrides: Any,
) -> list[dict[str, Any]]:
    """One row per setting: tokens/s, step time, MFU under both FLOP conventions (module docstring)."""
    dev = torch.device(device)
    full = llama_config(model, **overrides)
    depth = layers or full.num_hidden_layers
    if depth < min(2, full.num_hidden_layers):
        raise ValueError(f"--layers {depth}: use at least 2 (the per-layer cost is (t_k - t_1) / (k - 1))")
    peak = 1e12 * peak_tflops if peak_tflops else peak_flops(dev)
    head_dim = getattr(full, "head_dim", None) or full.hidden_size // full.num_attention_heads
    q_dim = full.num_attention_heads * head_dim
    tokens = batch * seq_len
    rows = []
    for setting in settings or DEFAULT_SETTINGS:
        measured = {}
        for k in sorted({1, depth} if depth < full.num_hidden_layers else {depth}):
            config = llama_config(model, **{**overrides, "num_hidden_layers": k})
            net = build(config, setting, dev, dtype)
            n_full = matmul_params(net) if k == depth else None
            step, mem = time_steps(net, random_batch(config, batch, seq_len, dev), steps, warmup)
            measured[k] = (step, mem, n_full)
            del net
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        step, mem, n_matmul = measured[depth]
        per_layer = (step - measured[1][0]) / (depth - 1) if depth > 1 and 1 in measured else step / depth
        if depth < full.num_hidden_layers:
            full_step = measured[1][0] + (full.num_hidden_layers - 1) * per_layer
            n_layer = (n_matmul - _head_params(full)) / depth
            n_full = _head_params(full) + n_layer * full.num_hidden_layers
        else:
            full_step, n_full = step, n_matmul
        attention = 12 * full.num_hidden_layers * seq_len * q_dim
        row = {
            "setting": setting.label, "layers": depth, "tokens": tokens, "step_s": step, "tokens_per_s": tokens / step,
            "per_layer_ms": 1e3 * per_layer, "peak_mem": mem, "full_depth": full.num_hidden_layers,
            "full_step_s": full_step, "full_tokens_per_s": tokens / full_step, "matmul_params_full": n_full,
            "flops_per_token_6N": 6 * n_full + attention, "flops_per_token_4N": 4 * n_full + attention,
        }
        for key in ("6N", "4N"):
            row[f"mfu_{key}"] = row[f"flops_per_token_{key}"] * row["full_tokens_per_s"] / peak if peak else float("nan")
        rows.append(row)
    return rows


def _head_params(config: Any) -> int:
    """lm_head parameters (vocab x hidden), the only matmul outside the decoder layers."""
    return config.vocab_size * config.hidden_size


COLUMNS = [
    ("setting", "setting", ""), ("layers", "layers run", "d"), ("tokens", "tokens/step", ",d"),
    ("step_s", "step s", ".3f"), ("tokens_per_s", "tok/s (layers run)", ",.0f"), ("per_layer_ms", "ms/layer", ".2f"),
    ("peak_mem", "peak mem", "bytes"), ("full_tokens_per_s", "tok/s (full depth)", ",.0f"),
    ("mfu_6N", "MFU 6N", ".1%"), ("mfu_4N", "MFU 4N (frozen)", ".1%"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for stdout."""
    return table(rows, COLUMNS)
