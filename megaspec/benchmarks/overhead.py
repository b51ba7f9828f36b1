"""Per-layer forward+backward cost of a frozen linear alone and with each adapter, in one run.

Every variant sees the same input x (B tokens x N, requires_grad as inside a network), the same
output gradient and the same frozen weight (one shared tensor, so a 8192 x 28672 layer is held
once); the reported overhead is time(variant) - time(base).

The frozen matmul dominates a step (on a CPU, +-300 ms of noise on a 3 s step at 4096 x 14336), so
an adapter's overhead can drown in it. The branch columns time the same modules with every frozen
linear replaced by a stand-in that returns zeros (`ZeroBase`): what is left is the adapter's own
forward and backward plus the add of its output, i.e. the overhead itself, measured directly. Its
reference is the stand-in alone (a B x M zero fill). `modes` picks "full", "branch" or both; the
branch alone makes B = 2048 affordable at 8192 x 28672 on a CPU. Variants are timed interleaved (one
step of each, round after round) so that drift on a busy machine hits all of them alike. Each
timed step follows `settle` untimed steps of the same variant: on a CPU a step right after another
variant's pays for that variant's allocator and cache state (after peft FourierFT's dense update,
up to 0.3 s on a 8192 x 28672 layer), which made the order of the table show in its numbers.

"+ops" counts the ATen ops (views excluded) one forward+backward of the variant dispatches beyond
the frozen linear's own (`count_ops`, at a few tokens so the fast path makes one pass, as on a GPU).
On a GPU each is a kernel launch with ~5-10 us of CPU dispatch: this is the part of an adapter's
cost that a CPU timing does not show and that does not shrink with the layer.

Variants: every registered megaspec method at its setting (SSH n=750 and n=5000 fast and n=750
through the dense path, FourierFT n=1000, LoRA r=16, low-rank methods at r=8, any other method
at AdapterConfig's defaults), HF peft LoRA r=8, 16, 64 and peft FourierFT n=1000.

Planning is not timed here (see `selection`). The step cost of an adapter does not depend on the
values of its plan, so by default (`synthetic_svd=True`) torch.linalg.svd is replaced during
planning by random factors of the right shapes: a float64 SVD of a 8192 x 28672 weight takes
minutes on a CPU and tells nothing about the step.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from megaspec.adapters import adapter_class
from megaspec.benchmarks.common import (
    PAPER_SETTINGS,
    Setting,
    default_setting,
    is_sparse_spectrum,
    registered_methods,
    table,
)
from megaspec.distributed import plan_adapters
from megaspec.spectral import dense_update

BASE = "frozen base alone"
REFERENCE = "peft lora r=16"


@dataclass
class Variant:
    """One row of the table: a name, its method family, trainable parameters and the module to time."""

    name: str
    method: str
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


class ZeroBase(nn.Module):
    """A frozen linear without its matmul: the same weight, sizes and hooks, output zeros (for branch timing)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # adapters may hook the base (SMoA takes its anchors in a forward hook, while ZeRO-3 has W0 gathered)
        for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                      "_forward_hooks_always_called"):
            getattr(self, hooks).update(getattr(linear, hooks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def branch_only(module: nn.Module, weight: torch.Tensor) -> Iterator[nn.Module]:
    """`module` with each frozen nn.Linear holding `weight` swapped for a ZeroBase inside the block."""
    if isinstance(module, nn.Linear) and module.weight is weight:
        yield ZeroBase(module)
        return
    swaps = [
        (parent, name, child) for parent in module.modules() for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child.weight is weight
    ]
    if not swaps:
        raise RuntimeError(f"no frozen linear to take out of {type(module).__name__}")
    for parent, name, child in swaps:
        setattr(parent, name, ZeroBase(child))
    try:
        yield module
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


def overhead_settings(methods: list[str] | None = None) -> list[Setting]:
    """The megaspec rows: SSH n=750 and 5000, LoRA r=16, every other method at its paper setting."""
    out = []
    for method in registered_methods():
        if methods is not None and method not in methods:
            continue
        if method == "ssh":
            out += [Setting(f"ssh n={n} (fast)", "ssh", {"n_coeffs": n, "selection": "per_layer"}) for n in (750, 5000)]
        elif method == "lora":
            out.append(Setting("lora r=16", "lora", {"lora_rank": 16, "alpha": 32.0}))
        else:
            setting = (PAPER_SETTINGS.get(method) or [default_setting(method)])[0]
            if is_sparse_spectrum(method):
                setting = Setting(f"{setting.label} (fast)", setting.method, setting.fields, setting.targets)
            out.append(setting)
    return out


@contextlib.contextmanager
def synthetic_svd(enabled: bool = True) -> Iterator[None]:
    """torch.linalg.svd returns random (U, S, Vh) of the right shapes and dtype inside the block."""
    if not enabled:
        yield
        return
    real = torch.linalg.svd

    def fake(a: torch.Tensor, full_matrices: bool = True, **_: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, n = a.shape[-2:]
        k = min(m, n)
        g = torch.Generator(device=a.device).manual_seed(0)
        u = torch.randn(m, m if full_matrices else k, dtype=a.dtype, device=a.device, generator=g)
        vh = torch.randn(n if full_matrices else k, n, dtype=a.dtype, device=a.device, generator=g)
        s = torch.rand(k, dtype=a.dtype, device=a.device, generator=g).sort(descending=True).values
        return u, s, vh

    torch.linalg.svd = fake
    try:
        yield
    finally:
        torch.linalg.svd = real


def shared(base: nn.Linear) -> nn.Linear:
    """A new frozen nn.Linear module holding the very same weight tensor (no copy)."""
    with torch.device("meta"):
        layer = nn.Linear(base.in_features, base.out_features, bias=False)
    layer.weight = base.weight
    return layer


def megaspec_adapter(base: nn.Linear, setting: Setting, synthetic: bool = True) -> nn.Module:
    """Wrap `base` (shared) with a planned megaspec adapter whose parameters are non-zero."""
    config = setting.config()
    adapter = adapter_class(setting.method)(shared(base), config, "layer")
    with synthetic_svd(synthetic):
        plan_adapters({"layer": adapter})
    with torch.no_grad():  # a non-zero update, so no path can shortcut
        for p in adapter.parameters(recurse=False):
            if p.requires_grad:
                p.normal_(0, 0.01)
    return adapter


def peft_adapter(base: nn.Linear, kind: str, **fields: object) -> nn.Module:
    """HF peft's LoRA or FourierFT around `base` (shared), with non-zero trainable parameters."""
    import peft

    config = {"lora": peft.LoraConfig, "fourierft": peft.FourierFTConfig}[kind](target_modules=["0"], **fields)
    model = peft.get_peft_model(nn.Sequential(shared(base)), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    return model


def _builders(base: nn.Linear, methods: list[str] | None, synthetic: bool) -> list[tuple[str, str, Callable[[], nn.Module]]]:
    """(name, method, build) of every selected variant, base first."""
    m, n = base.out_features, base.in_features
    out: list[tuple[str, str, Callable[[], nn.Module]]] = [(BASE, "base", lambda: base)]
    ssh750: list[nn.Module] = []
    for setting in overhead_settings(methods):
        def build(setting: Setting = setting) -> nn.Module:
            adapter = megaspec_adapter(base, setting, synthetic)
            if setting.label.startswith("ssh n=750"):
                ssh750.append(adapter)
            return adapter

        out.append((f"megaspec {setting.label}", setting.method, build))
        if setting.label.startswith("ssh n=5000"):
            out.append(("megaspec ssh n=750 (dense path)", "ssh", lambda: DenseSSH(ssh750[0])))
    if methods is None or "peft_lora" in methods:
        for r in (8, 16, 64):
            out.append((f"peft lora r={r}", "peft_lora", lambda r=r: peft_adapter(base, "lora", r=r, lora_alpha=2 * r)))
    if methods is None or "peft_fourierft" in methods:
        out.append(("peft fourierft n=1000", "peft_fourierft", lambda: peft_adapter(base, "fourierft", n_frequency=min(1000, m * n))))
    return out


def variants(base: nn.Linear, methods: list[str] | None = None, synthetic: bool = True, only: str | None = None) -> list[Variant]:
    """The modules compared (the base, and those whose name matches the regex `only`, if given); a variant
    that cannot be built is reported on stderr and left out."""
    rows = []
    for name, method, build in _builders(base, methods, synthetic):
        if only is not None and name != BASE and not re.search(only, name):
            continue
        try:
            module = build()
        except Exception as err:  # a method that cannot run here must not sink the others
            print(f"skipped {name}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append(Variant(name, method, trainable, module))
    return rows


def time_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward+backward (input and adapter gradients), synchronised on GPU."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = module(x)
    if out.requires_grad:  # not so for the branch reference (ZeroBase alone): a zero fill, nothing to differentiate
        out.backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the block, views excluded (they launch nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


# Tokens for counting ops: few enough for one CPU pass of the sparse-spectrum fast path (as on a
# GPU, which takes all tokens in one pass); the count does not depend on the tokens otherwise.
OP_COUNT_TOKENS = 8


def count_ops(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Non-view ATen ops one forward+backward of `module` dispatches: on a GPU each is a kernel launch
    (~5-10 us of CPU time per op in eager PyTorch), which matters where the layer's own work is small."""
    x = x[:OP_COUNT_TOKENS].detach().clone().requires_grad_(True)
    grad = grad[:OP_COUNT_TOKENS]
    module.zero_grad(set_to_none=True)
    with _OpCounter() as counter:
        out = module(x)
        if out.requires_grad:
            out.backward(grad)
    return counter.count


def run(
    shape: tuple[int, int],
    tokens: int,
    reps: int,
    warmup: int,
    device: str,
    dtype: torch.dtype,
    methods: list[str] | None = None,
    synthetic: bool = True,
    settle: int = 1,
    modes: tuple[str, ...] = ("full", "branch"),
    only: str | None = None,
) -> list[dict]:
    """Time every variant at one (out, in) shape, interleaved so drift hits all alike; table rows."""
    if not modes or set(modes) - {"full", "branch"}:
        raise ValueError(f"modes={modes!r}; use 'full', 'branch' or both")
    torch.manual_seed(0)
    m, n = shape
    base = nn.Linear(n, m, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, m, device=device, dtype=dtype)
    rows = []
    for v in variants(base, methods, synthetic, only):
        v.module.to(device=device, dtype=dtype)  # as DeepSpeed's bf16 cast: adapters in the run's dtype too
        try:
            time_step(v.module, x, grad)  # a variant that fails at this dtype is left out, not the run
        except Exception as err:
            print(f"skipped {v.name}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        rows.append(v)
    ops = {v.name: count_ops(v.module, x, grad) for v in rows}
    times: dict[tuple[str, str], list[float]] = {(v.name, mode): [] for v in rows for mode in modes}
    for i in range(warmup + reps):
        for v in rows:
            for mode in modes:
                with (branch_only(v.module, base.weight) if mode == "branch" else contextlib.nullcontext(v.module)) as module:
                    for _ in range(settle):
                        time_step(module, x, grad)
                    t = time_step(module, x, grad)
                if i >= warmup:
                    times[(v.name, mode)].append(t)
    table = [
        {"shape": f"{m}x{n}", "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "variant": v.name,
         "method": v.method, "trainable": v.trainable, "ops": ops[v.name], "extra_ops": ops[v.name] - ops[rows[0].name]}
        for v in rows
    ]
    for mode, prefix in (("full", ""), ("branch", "branch_")):
        if mode not in modes:
            continue
        for r in table:
            r[f"{prefix}median_ms"] = 1e3 * statistics.median(times[(r["variant"], mode)])
            r[f"{prefix}min_ms"] = 1e3 * min(times[(r["variant"], mode)])
        base_ms = table[0][f"{prefix}median_ms"]
        reference = next((r for r in table if r["variant"] == REFERENCE), None)
        lora_over = reference[f"{prefix}median_ms"] - base_ms if reference else float("nan")
        for r in table:
            r[f"{prefix}overhead_ms"] = r[f"{prefix}median_ms"] - base_ms
            r[f"{prefix}overhead_vs_peft_lora16"] = r[f"{prefix}overhead_ms"] / lora_over if lora_over > 0 else float("nan")
            if mode == "full":
                r["ratio_to_base"] = r["median_ms"] / base_ms
    return table


COLUMNS = [
    ("shape", "shape", ""), ("tokens", "B", "d"), ("variant", "variant", ""), ("trainable", "trainable", ",d"),
    ("extra_ops", "+ops", "+d"),
    ("median_ms", "median ms", ".2f"), ("min_ms", "min ms", ".2f"), ("overhead_ms", "overhead ms", "+.2f"),
    ("ratio_to_base", "x base", ".3f"), ("overhead_vs_peft_lora16", "ovh / peft LoRA16 ovh", ".2f"),
    ("branch_median_ms", "branch ms", ".2f"), ("branch_min_ms", "branch min ms", ".2f"), ("branch_overhead_ms", "branch ovh ms", "+.2f"),
    ("branch_overhead_vs_peft_lora16", "branch ovh / peft LoRA16", ".2f"),
]


def format_table(rows: list[dict]) -> str:
    """A fixed-width table for stdout (columns of a mode that did not run are left out)."""
    return table(rows, [c for c in COLUMNS if any(c[0] in r for r in rows)])
