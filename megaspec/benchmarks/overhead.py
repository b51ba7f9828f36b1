"""Per-layer forward+backward cost of a frozen linear alone and with each adapter, in one run.

Every variant sees the same input x (B tokens x N, requires_grad as inside a network), the same
output gradient and the same frozen weight; the reported overhead is time(variant) - time(base).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from megaspec.adapters import adapter_class
from megaspec.config import AdapterConfig
from megaspec.dist import plan_adapters
from megaspec.spectral import dense_update


@dataclass
class Variant:
    """One row of the table: a name, trainable parameters and the module to time."""

    name: str
    trainable: int
    module: nn.Module


class DenseSSH(nn.Module):
    """SSH through the dense path (dW = IDHT2(S) materialised, then an extra matmul), for comparison."""

    def __init__(self, adapter: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        dw = dense_update(a.coeffs * a.scale, a.rows, a.cols, a.shape, a.kernel)
        return a.base(x) + x @ dw.to(x.dtype).T


def _megaspec(base: nn.Linear, method: str, **fields: object) -> nn.Module:
    """Wrap a copy of `base` with a megaspec adapter and plan it on its weight."""
    config = AdapterConfig(method=method, selection="per_layer", **fields)
    adapter = adapter_class(method)(_copy(base), config, "layer")
    plan_adapters({"layer": adapter})
    with torch.no_grad():  # non-zero update so no path can shortcut
        for p in adapter.parameters(recurse=False):
            p.normal_(0, 0.01)
    return adapter


def _peft(base: nn.Linear, kind: str, **fields: object) -> nn.Module:
    import peft

    config = {"lora": peft.LoraConfig, "fourierft": peft.FourierFTConfig}[kind](target_modules=["0"], **fields)
    model = peft.get_peft_model(nn.Sequential(_copy(base)), config)
    if kind == "fourierft":
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_()
    return model


def _copy(base: nn.Linear) -> nn.Linear:
    layer = nn.Linear(base.in_features, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(base.weight)
    return layer.requires_grad_(False)


def variants(base: nn.Linear) -> list[Variant]:
    """The modules compared by the issue: base, megaspec SSH fast/dense, peft FourierFT and LoRA."""
    ssh750 = _megaspec(base, "ssh", n_coeffs=750)
    rows = [
        Variant("frozen base alone", 0, base),
        Variant("megaspec ssh n=750 (fast)", 750, ssh750),
        Variant("megaspec ssh n=5000 (fast)", 5000, _megaspec(base, "ssh", n_coeffs=5000)),
        Variant("megaspec ssh n=750 (dense path)", 750, DenseSSH(ssh750)),
        Variant("megaspec fourierft n=1000 (fast)", 1000, _megaspec(base, "fourierft", n_coeffs=1000)),
        Variant("megaspec lora r=16", 16 * (base.in_features + base.out_features), _megaspec(base, "lora", rank=16)),
        Variant("peft fourierft n=1000", 1000, _peft(base, "fourierft", n_frequency=1000)),
        Variant("peft lora r=16", 16 * (base.in_features + base.out_features), _peft(base, "lora", r=16, lora_alpha=32)),
    ]
    return rows


def time_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward+backward (input and adapter gradients), synchronised on GPU."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    module(x).backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(shape: tuple[int, int], tokens: int, reps: int, warmup: int, device: str, dtype: torch.dtype) -> list[dict]:
    """Time every variant at one (out, in) shape, interleaved so drift hits all alike; table rows."""
    torch.manual_seed(0)
    m, n = shape
    base = nn.Linear(n, m, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, m, device=device, dtype=dtype)
    rows = variants(base)
    for v in rows:
        v.module.to(device=device)
        if dtype != torch.float32:
            v.module.to(dtype=dtype)
    times: dict[str, list[float]] = {v.name: [] for v in rows}
    for i in range(warmup + reps):
        for v in rows:
            t = time_step(v.module, x, grad)
            if i >= warmup:
                times[v.name].append(t)
    table = [
        {"shape": f"{m}x{n}", "tokens": tokens, "variant": v.name, "trainable": v.trainable,
         "median_ms": 1e3 * statistics.median(times[v.name]), "min_ms": 1e3 * min(times[v.name])}
        for v in rows
    ]
    base_ms = table[0]["median_ms"]
    lora_over = next(r for r in table if r["variant"] == "peft lora r=16")["median_ms"] - base_ms
    for r in table:
        r["overhead_ms"] = r["median_ms"] - base_ms
        r["ratio_to_base"] = r["median_ms"] / base_ms
        r["overhead_vs_peft_lora16"] = r["overhead_ms"] / lora_over if lora_over > 0 else float("nan")
    return table


def format_table(rows: list[dict]) -> str:
    """A fixed-width table for stdout."""
    head = f"{'shape':<12}{'variant':<36}{'trainable':>10}{'median ms':>11}{'overhead ms':>13}{'x base':>8}{'ovh/LoRA16':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['shape']:<12}{r['variant']:<36}{r['trainable']:>10,}{r['median_ms']:>11.2f}{r['overhead_ms']:>13.2f}"
            f"{r['ratio_to_base']:>8.3f}{r['overhead_vs_peft_lora16']:>11.2f}"
        )
    return "\n".join(lines)
