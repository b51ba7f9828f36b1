"""Peak memory and step time of a training step with and without gradient checkpointing, and the
peak of S2FT's gradient estimate by layer-group budget.

Peak memory is counted by LiveBytes: every tensor storage allocated while a step runs (forward,
backward, recompute), from its allocation to its release, so the peak is the step's own bytes
above what was live before it (the weights). It is allocator-independent and exact on CPU; a GPU
caching allocator would add its fragmentation on top. Step time is a forward+backward of the
frozen base with SSH adapters (no optimizer), timed without LiveBytes.
"""

from __future__ import annotations

import statistics
import time
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megaspec.benchmarks.common import LLAMA_CONFIGS
from megaspec.config import AdapterConfig
from megaspec.model import adapters_of, apply_adapters
from megaspec.train.activations import count_parameters, enable_checkpointing, use_checkpointing

# "small": a 12-layer LLaMA of GPT-2-small width (GQA); "8b-2layers": two LLaMA-3.1-8B decoder layers with a
# reduced vocabulary (the full one's embeddings and logits would dwarf two layers on a CPU)
MODELS: dict[str, dict[str, Any]] = {
    "small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False),
    "8b-2layers": {**LLAMA_CONFIGS["llama-3.1-8b"], "num_hidden_layers": 2, "vocab_size": 8192},
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),  # smoke tests
}
FULL_SIZE = {"small": "small", "8b-2layers": "llama-3.1-8b", "tiny": "tiny"}  # the model whose auto decision a row reports


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the mode and still alive; `peak` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._keys.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in inputs and key not in self._keys:  # views and in-place results are not new memory
                self._keys.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def build(name: str, dtype: torch.dtype, n_coeffs: int, seed: int = 0) -> nn.Module:
    """A frozen LLaMA of MODELS[name] with SSH adapters on q,v (the trainer's defaults), in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**MODELS[name])).to(dtype)
    model.config.use_cache = False
    apply_adapters(model, AdapterConfig(method="ssh", n_coeffs=n_coeffs, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1e-3)  # non-zero coefficients: no path can shortcut
    return model.train()


def step(model: nn.Module, ids: torch.Tensor) -> float:
    """One forward+backward on `ids` (labels = ids); gradients are dropped after."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss.item()


def measure(model: nn.Module, ids: torch.Tensor, steps: int, warmup: int) -> dict[str, Any]:
    """Median step time over `steps` after `warmup`, then one step's peak bytes under LiveBytes."""
    for _ in range(warmup):
        step(model, ids)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(model, ids)
        times.append(time.perf_counter() - start)
    tracker = LiveBytes()
    with tracker:
        step(model, ids)
    return {"step_s": statistics.median(times), "min_s": min(times), "peak_bytes": tracker.peak, "loss": loss}


def run(models: list[str], batch: int = 1, seq_len: int = 512, steps: int = 3, warmup: int = 1,
        dtype: torch.dtype = torch.float32, n_coeffs: int = 750) -> list[dict[str, Any]]:
    """One row per (model, checkpointing off/on): weights, peak step bytes above them, step time."""
    from transformers import LlamaConfig

    rows = []
    for name in models:
        model = build(name, dtype, n_coeffs)
        config = model.config
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        full = MODELS[name] if FULL_SIZE[name] == name else LLAMA_CONFIGS[FULL_SIZE[name]]
        auto, _ = use_checkpointing("auto", count_parameters(LlamaConfig(**full)))
        for on in (False, True):
            if on:
                enable_checkpointing(model)
            result = measure(model, ids, steps, warmup)
            rows.append({"model": name, "layers": config.num_hidden_layers, "dtype": str(dtype).removeprefix("torch."),
                         "tokens": batch * seq_len, "checkpointing": "on" if on else "off", "weights": weights,
                         **result, "auto_full": f"{FULL_SIZE[name]}: {'on' if auto else 'off'}"})
        off, on_row = rows[-2], rows[-1]
        on_row["peak_vs_off"] = on_row["peak_bytes"] / off["peak_bytes"]
        on_row["time_vs_off"] = on_row["step_s"] / off["step_s"]
        del model
    return rows


COLUMNS = [("model", "model", ""), ("layers", "layers", "d"), ("dtype", "dtype", ""), ("tokens", "tokens", "d"),
           ("checkpointing", "grad ckpt", ""), ("weights", "weights", "bytes"), ("peak_bytes", "step peak above weights", "bytes"),
           ("peak_vs_off", "peak / off", ".3f"), ("step_s", "median step s", ".2f"), ("min_s", "min step s", ".2f"),
           ("time_vs_off", "time / off", ".3f"), ("loss", "loss", ".4f"), ("auto_full", "trainer's auto for", "")]


# --- S2FT's gradient estimate --------------------------------------------------------------------


def s2ft_estimate(name: str = "8b-2layers", budgets: tuple[int, ...] = (2**30, 80 * 2**20, 2**24), batch: int = 1, seq_len: int = 256,
                  dtype: torch.dtype = torch.float32, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> list[dict[str, Any]]:
    """Peak bytes of the estimate passes (estimate_updates over each layer group) by group budget, measured and predicted.

    Bound: the passes with no layer estimated (measured) + the group's fp32 buffers + one transient
    M x N contribution of the largest layer (the buffers fill while the backward frees activations,
    so the measured peak is lower). Planning (plan_from_estimate on the layer's owner) is not
    included: its peak is one fp64 copy of the layer plus K^2 fp32 whatever the grouping.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaspec.calibrate import estimate_groups, estimate_updates

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODELS[name])).to(dtype)
    model.config.use_cache = False
    apply_adapters(model, AdapterConfig(method="s2ft", n_coeffs=100, target_modules=list(targets)), defer_calibration=True)
    adapters = adapters_of(model)
    shapes = {n: a.shape for n, a in adapters.items()}
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids}]
    estimate_updates(model, {}, batches)  # warm-up: caches built once (masks, RoPE, spectrum indices) stay out of the peaks
    tracker = LiveBytes()
    with tracker:  # the same forward/backward with no layer estimated: activations and gradients alone
        estimate_updates(model, {}, batches)
    passes = tracker.peak
    rows = []
    for budget in budgets:
        groups = estimate_groups(shapes, budget)
        peaks, kept = [], []
        for group in groups:
            tracker = LiveBytes()
            with tracker:
                sums, _ = estimate_updates(model, {n: adapters[n] for n in group}, batches)
                kept.append(tracker.live)  # what the passes leave allocated: the group's buffers
                del sums
            peaks.append(tracker.peak)
        held = max(sum(4 * shapes[n][0] * shapes[n][1] for n in g) for g in groups)
        largest = max(4 * m * n for m, n in shapes.values())
        rows.append({"model": name, "targets": ",".join(targets), "layers": len(adapters), "budget": budget,
                     "groups": len(groups), "buffers_held": held, "measured_held": max(kept), "passes_alone": passes,
                     "bound": passes + held + largest, "measured_peak": max(peaks)})
    return rows


ESTIMATE_COLUMNS = [("model", "model", ""), ("targets", "targets", ""), ("layers", "adapted layers", "d"),
                    ("budget", "group budget", "bytes"), ("groups", "groups (passes)", "d"),
                    ("buffers_held", "fp32 buffers held", "bytes"), ("measured_held", "measured left after passes", "bytes"),
                    ("passes_alone", "passes alone", "bytes"),
                    ("bound", "bound: passes + held + 1 transient", "bytes"), ("measured_peak", "measured peak", "bytes")]


def extrapolate_estimate(budgets_mb: tuple[int, ...] = (1024, 2048)) -> list[dict[str, Any]]:
    """fp32 estimate buffers held at once per rank on 8B and 70B (q,v and all seven projections): all at once and in groups."""
    from megaspec.benchmarks.common import decoder_linear_shapes, llama_config
    from megaspec.calibrate import estimate_groups

    rows = []
    for model in ("llama-3.1-8b", "llama-3-70b"):
        config = llama_config(model)
        per_layer = decoder_linear_shapes(config)
        for targets in (("q_proj", "v_proj"), tuple(per_layer)):
            shapes = {f"{i}.{t}": per_layer[t] for i in range(config.num_hidden_layers) for t in targets}
            row: dict[str, Any] = {"model": model, "targets": ",".join(t.removesuffix("_proj") for t in targets),
                                   "all_at_once": sum(4 * m * n for m, n in shapes.values())}
            for mb in budgets_mb:
                groups = estimate_groups(shapes, mb * 2**20)
                row[f"held_{mb}"] = max(sum(4 * shapes[n][0] * shapes[n][1] for n in g) for g in groups)
                row[f"groups_{mb}"] = len(groups)
            rows.append(row)
    return rows


def extrapolate_columns(budgets_mb: tuple[int, ...] = (1024, 2048)) -> list[tuple[str, str, str]]:
    """Columns of the extrapolate_estimate table."""
    columns = [("model", "model", ""), ("targets", "targets", ""), ("all_at_once", "buffers, all layers at once", "bytes")]
    for mb in budgets_mb:
        columns += [(f"held_{mb}", f"held, {mb} MiB groups", "bytes"), (f"groups_{mb}", "passes", "d")]
    return columns
