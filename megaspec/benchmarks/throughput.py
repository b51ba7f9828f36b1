"""Training throughput and MFU of a LLaMA-3.1-8B-shaped model on one GPU: frozen only vs SSH vs LoRA.

Random bf16 weights are built on the device (nothing is downloaded); a step is forward + loss +
backward (+ AdamW on the adapter parameters), inputs of random tokens. By default the step is the
trainer's own: the model is built under deepspeed.zero.Init and run by a DeepSpeed ZeRO-3 engine on
one rank (`engine="deepspeed"`, the run's ds_config with its micro batch set to `batch`), so the
numbers include ZeRO-3's parameter fetch hooks and gradient bucketing; `engine="plain"` times the
same model in plain PyTorch (torch.optim.AdamW), the lower bound of what the engine adds. The frozen
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
import gc
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from megaspec.benchmarks.common import PAPER_SETTINGS, Setting, llama_config, table

NO_CUDA = "throughput needs a CUDA GPU; none found"
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
FROZEN = Setting("frozen only", "")
DEFAULT_SETTINGS = [FROZEN, PAPER_SETTINGS["ssh"][0], Setting("lora r=16", "lora", {"lora_rank": 16, "alpha": 32.0})]


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
        if adapter_class(setting.method).needs_calibration:
            batch = random_batch(config, 1, 128, device)
            apply_adapters(model, setting.config(), calibration=[batch])
        else:
            apply_adapters(model, setting.config())
        model.to(dtype)  # as DeepSpeed's bf16 engine: adapters in the run's dtype too
    model.enable_input_require_grads()
    return model.train()


def zero3_config(ds_config: dict[str, Any], batch: int, dtype: torch.dtype, hidden_size: int) -> dict[str, Any]:
    """The run's DeepSpeed config for one rank: "auto" resolved, micro batch `batch`, bf16 iff dtype is bf16."""
    from megaspec.train.dsconfig import resolve_ds_config

    cfg = resolve_ds_config(ds_config, lr=1e-5, max_steps=1000, warmup_steps=1, hidden_size=hidden_size)
    cfg.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1)
    cfg.pop("train_batch_size", None)
    cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
    cfg.pop("fp16", None)
    return cfg


def build_zero3(config: Any, setting: Setting, dtype: torch.dtype, ds_config: dict[str, Any]) -> Any:
    """A random-weight LLaMA partitioned by zero.Init, adapted by `setting`, inside a ZeRO-3 engine.

    A ZeRO-3 engine cannot back-propagate without an optimizer (DeepSpeed 0.19.8's backward hook needs
    one), so the frozen-only row trains the final RMSNorm weight alone (hidden_size parameters): the
    same engine step as the adapter rows, with nothing of an adapter in it.
    """
    import deepspeed
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from megaspec.distributed.group import init_distributed
    from megaspec.model import apply_adapters

    init_distributed()
    torch.manual_seed(0)
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers builds under zero.Init while it lives)
    model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.use_cache = False
    model.requires_grad_(False)
    if setting.method:
        apply_adapters(model, setting.config(), calibration=_calibration(config, setting, model))
    else:
        model.model.norm.weight.requires_grad_(True)
    model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    engine.train()  # DeepSpeedEngine.train returns None
    return engine


def _calibration(config: Any, setting: Setting, model: nn.Module) -> list[dict[str, torch.Tensor]] | None:
    """One batch of random tokens for methods planned on activations (S2FT), else None."""
    from megaspec.adapters import adapter_class

    if not adapter_class(setting.method).needs_calibration:
        return None
    return [random_batch(config, 1, 128, next(model.parameters()).device)]


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
            total += int(getattr(module.weight, "ds_numel", module.weight.numel()))  # ZeRO-3 empties the local tensor
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> tuple[float, float | None]:
    """(median seconds per training step, peak allocated bytes or None off CUDA); `model` may be a DeepSpeed engine."""
    device = batch["input_ids"].device
    engine = model if hasattr(model, "backward") and hasattr(model, "step") else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params and engine is None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
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
    ds_config: dict[str, Any] | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """One row per setting: tokens/s, step time, MFU under both FLOP conventions (module docstring).

    With `ds_config` (a DeepSpeed config, "auto" allowed) each row runs in a ZeRO-3 engine on one
    rank; without it, in plain PyTorch.
    """
    dev = torch.device(device)
    full = llama_config(model, **overrides)
    depth = layers or full.num_hidden_layers
    if depth < min(2, full.num_hidden_layers):
        raise ValueError(f"--layers {depth}: use at least 2 (the per-layer cost is (t_k - t_1) / (k - 1))")
    peak = 1e12 * peak_tflops if peak_tflops else peak_flops(dev)
    head_dim = getattr(full, "head_dim", None) or full.hidden_size // full.num_attention_heads
    q_dim = full.num_attention_heads * head_dim
    tokens = batch * seq_len
    # An engine row joins a one-rank process group and stays in it, as deepspeed.comm does: destroying
    # the torch group would leave deepspeed.comm holding a dead one for the rest of the process.
    return [_row(setting, model, overrides, depth, full, dev, dtype, ds_config, batch, seq_len, steps, warmup, peak,
                 q_dim, tokens) for setting in settings or DEFAULT_SETTINGS]


def _row(setting: Setting, model: str, overrides: dict[str, Any], depth: int, full: Any, dev: torch.device,
         dtype: torch.dtype, ds_config: dict[str, Any] | None, batch: int, seq_len: int, steps: int, warmup: int,
         peak: float | None, q_dim: int, tokens: int) -> dict[str, Any]:
    """One setting's row: timed at 1 and `depth` layers, extrapolated to the full depth."""
    measured = {}
    for k in sorted({1, depth} if depth < full.num_hidden_layers else {depth}):
        config = llama_config(model, **{**overrides, "num_hidden_layers": k})
        if ds_config is None:
            net = build(config, setting, dev, dtype)
        else:
            net = build_zero3(config, setting, dtype, zero3_config(ds_config, batch, dtype, config.hidden_size))
        n_full = matmul_params(net) if k == depth else None
        trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in net.parameters() if p.requires_grad)
        step, mem = time_steps(net, random_batch(config, batch, seq_len, dev), steps, warmup)
        measured[k] = (step, mem, n_full, trainable)
        if hasattr(net, "destroy"):  # a DeepSpeed engine: drop its hooks and buffers before the next row
            net.destroy()
        del net
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    step, mem, n_matmul, trainable = measured[depth]
    per_layer = (step - measured[1][0]) / (depth - 1) if depth > 1 and 1 in measured else step / depth
    if depth < full.num_hidden_layers:
        full_step = measured[1][0] + (full.num_hidden_layers - 1) * per_layer
        n_layer = (n_matmul - _head_params(full)) / depth
        n_full = _head_params(full) + n_layer * full.num_hidden_layers
    else:
        full_step, n_full = step, n_matmul
    attention = 12 * full.num_hidden_layers * seq_len * q_dim
    row = {
        "setting": setting.label, "engine": "plain" if ds_config is None else "zero3", "layers": depth,
        "trainable": trainable, "tokens": tokens, "step_s": step, "tokens_per_s": tokens / step,
        "per_layer_ms": 1e3 * per_layer, "peak_mem": mem, "full_depth": full.num_hidden_layers,
        "full_step_s": full_step, "full_tokens_per_s": tokens / full_step, "matmul_params_full": n_full,
        "flops_per_token_6N": 6 * n_full + attention, "flops_per_token_4N": 4 * n_full + attention,
    }
    for key in ("6N", "4N"):
        row[f"mfu_{key}"] = row[f"flops_per_token_{key}"] * row["full_tokens_per_s"] / peak if peak else float("nan")
    return row


def _head_params(config: Any) -> int:
    """lm_head parameters (vocab x hidden), the only matmul outside the decoder layers."""
    return config.vocab_size * config.hidden_size


COLUMNS = [
    ("setting", "setting", ""), ("engine", "engine", ""), ("trainable", "trainable (layers run)", ",d"), ("layers", "layers run", "d"), ("tokens", "tokens/step", ",d"),
    ("step_s", "step s", ".3f"), ("tokens_per_s", "tok/s (layers run)", ",.0f"), ("per_layer_ms", "ms/layer", ".2f"),
    ("peak_mem", "peak mem", "bytes"), ("full_tokens_per_s", "tok/s (full depth)", ",.0f"),
    ("mfu_6N", "MFU 6N", ".1%"), ("mfu_4N", "MFU 4N (frozen)", ".1%"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for stdout."""
    return table(rows, COLUMNS)
