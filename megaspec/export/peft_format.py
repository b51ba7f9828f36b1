"""An adapter HF peft loads with PeftModel.from_pretrained(base, DIR) (and vLLM serves, for LoRA).

- FourierFT as peft's FourierFT: peft redraws the positions at load from random_loc_seed, so they
  are checked against megaspec's, and the spectrum is written in peft's draw order. megaspec's
  per-layer scale (sqrt(M N) by default) is folded into the values when layers disagree (peft has
  one `scaling`).
- LoRA as trained (r, lora_alpha, A, B).
- Any other method, or any method with --lora / --lora_rank, as LoRA from a factorisation dW = B A:
  exact for the structured updates (Adapter.low_rank_factors: SSH and FourierFT rank <= 2 * #distinct
  frequencies, LoRA, Spectral Adapter), an exact SVD from row blocks otherwise; B A is reduced
  to its numerical rank, or truncated to --lora_rank r. lora_alpha = r everywhere (scaling 1), with
  rank_pattern / alpha_pattern for per-layer exact ranks. Each layer's relative residual
  ||dW - B A||_F / ||dW||_F is measured against delta_weight and reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megaspec.adapters import Adapter
from megaspec.distributed.assign import assign_layers
from megaspec.distributed.comm import gather_to_rank0, world_size
from megaspec.distributed.comm import rank as process_rank
from megaspec.export.factors import LowRank, compress, residual, svd_by_rows
from megaspec.export.run import ExportError, Run, update_rows
from megaspec.export.sources import Source

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"


def factor_layer(adapter: Adapter, weight: torch.Tensor | None, lora_rank: int | None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """LoRA factors (in `dtype`) of one layer at its exact rank (lora_rank None) or `lora_rank`, with the measured residual.

    The SVD and the residual use float64 rows of dW (update_rows), so the residual is that of the
    exported factors, rounding to `dtype` included.
    """
    rows = update_rows(adapter, weight)
    with torch.no_grad():
        exact = adapter.low_rank_factors()
    low: LowRank = compress(*exact) if exact is not None else svd_by_rows(rows, adapter.shape)
    r = max(low.rank, 1) if lora_rank is None else lora_rank
    b, a = (f.to(dtype) for f in low.factors(r))
    how = "structured" if exact is not None else "svd"
    return {"B": b, "A": a, "exact_rank": low.rank, "rank": r, "residual": residual(rows, b, a), "how": how}


def lora_factors(
    adapters: dict[str, Adapter], lora_rank: int | None, open_source: Callable[[], Source] | None, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, Any]]:
    """Every layer's factors on rank 0 (empty elsewhere); layers are spread over ranks. Collective.

    Layers whose update reads the frozen weight (SMoA) get it attached, read from `open_source()` in
    layer order on every rank (a gather under ZeRO-3).
    """
    names = list(adapters)
    owners = dict(zip(names, assign_layers([adapters[n].shape[0] * adapters[n].shape[1] for n in names], world_size()), strict=True))
    reading = [n for n in names if adapters[n].update_reads_weight]
    source = open_source() if reading and open_source is not None else None
    local = {}
    for name in names:
        mine = owners[name] == process_rank()
        weight = None
        if name in reading and source is not None:
            raw = source.read(f"{name}.weight", wanted=mine)
            weight = raw.float() if raw is not None else None
        if mine:
            local[name] = factor_layer(adapters[name], weight, lora_rank, dtype)
    results: dict[str, dict[str, Any]] = {}
    for part in gather_to_rank0(local) or []:
        results.update(part)
    return {name: results[name] for name in names if name in results}


def _lora_config(run: Run, r: int, alpha: float, rank_pattern: dict[str, int], alpha_pattern: dict[str, float]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(run.adapter_config.target_modules), lora_dropout=0.0, bias="none",
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, task_type="CAUSAL_LM", base_model_name_or_path=run.model,
    )


def lora_from_factors(run: Run, factors: dict[str, dict[str, Any]], dtype: torch.dtype) -> tuple[Any, dict[str, torch.Tensor]]:
    """A peft LoRA with scaling 1: r = lora_alpha = the largest rank, patterns for the other layers."""
    ranks = {name: f["rank"] for name, f in factors.items()}
    r = max(ranks.values())
    pattern = {name: k for name, k in ranks.items() if k != r}
    config = _lora_config(run, r, r, pattern, {name: float(k) for name, k in pattern.items()})
    tensors = {}
    for name, f in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = f["A"].to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = f["B"].to(dtype).contiguous()
    return config, tensors


def lora_as_trained(run: Run, adapters: dict[str, Adapter], dtype: torch.dtype) -> tuple[Any, dict[str, torch.Tensor]]:
    """megaspec LoRA as peft LoRA: the trained A and B, lora_alpha / r = the adapter's scale."""
    r = run.adapter_config.lora_rank
    scales = {a.scale for a in adapters.values()}
    if len(scales) != 1:
        raise ExportError(f"LoRA layers disagree on their scale {sorted(scales)}; export with --lora_rank")
    config = _lora_config(run, r, scales.pop() * r, {}, {})
    tensors = {}
    for name, a in adapters.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.lora_A.detach().to(dtype).cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = a.lora_B.detach().to(dtype).cpu().contiguous()
    return config, tensors


def peft_fourierft_positions(shape: tuple[int, int], count: int, seed: int) -> torch.Tensor:
    """The flat positions peft's FourierFT draws at load: randperm(M N, seed)[:n], in draw order."""
    m, n = shape
    return torch.randperm(m * n, generator=torch.Generator().manual_seed(seed))[:count]


def fourierft_spectrum(adapter: Adapter, seed: int) -> torch.Tensor:
    """The coefficients in peft's draw order; ExportError if peft would draw other positions."""
    m, n = adapter.shape
    flat, order = (adapter.rows.cpu() * n + adapter.cols.cpu()).sort()
    drawn = peft_fourierft_positions(adapter.shape, flat.numel(), seed)
    where = torch.searchsorted(flat, drawn).clamp_max(flat.numel() - 1)
    if not torch.equal(flat[where], drawn):
        raise ExportError(
            f"layer {adapter.name}: its positions are not peft's randperm(M*N, seed={seed}) draw, so peft's FourierFT "
            "would load different positions; export with --lora instead"
        )
    return adapter.coeffs.detach().cpu().float()[order[where]]


def fourierft_as_peft(run: Run, adapters: dict[str, Adapter], dtype: torch.dtype) -> tuple[Any, dict[str, torch.Tensor]]:
    """peft FourierFTConfig + spectra: n_frequency_pattern for layers of another size, one scaling."""
    from peft import FourierFTConfig

    seed = run.adapter_config.seed
    counts = {name: int(a.rows.numel()) for name, a in adapters.items()}
    n_frequency = Counter(counts.values()).most_common(1)[0][0]
    scales = {float(a.scale) for a in adapters.values()}
    # one shared scale is kept as peft's `scaling`; otherwise each layer's scale is folded into its values
    scaling = scales.pop() if len(scales) == 1 else 1.0
    tensors = {}
    for name, a in adapters.items():
        values = fourierft_spectrum(a, seed) * (float(a.scale) / scaling)
        tensors[f"{PREFIX}{name}.fourierft_spectrum"] = values.to(dtype).contiguous()
    config = FourierFTConfig(
        n_frequency=n_frequency, scaling=scaling, random_loc_seed=seed, target_modules=list(run.adapter_config.target_modules),
        n_frequency_pattern={name: k for name, k in counts.items() if k != n_frequency}, init_weights=True,
        task_type="CAUSAL_LM", base_model_name_or_path=run.model,
    )
    return config, tensors


def export_peft(
    run: Run,
    adapters: dict[str, Adapter],
    folder: Path | None,
    lora_rank: int | None = None,
    as_lora: bool = False,
    dtype: torch.dtype = torch.float32,
    open_source: Callable[[], Source] | None = None,
) -> dict[str, Any]:
    """Write the peft adapter into `folder` (rank 0's; None elsewhere). Collective across ranks."""
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ExportError("--format peft needs the peft package (pip install peft)") from e
    method = run.adapter_config.method
    factors: dict[str, dict[str, Any]] = {}
    if method == "fourierft" and lora_rank is None and not as_lora:
        config, tensors = fourierft_as_peft(run, adapters, dtype)
        kind = "fourierft"
    elif method == "lora" and lora_rank is None:
        config, tensors = lora_as_trained(run, adapters, dtype)
        kind = "lora (as trained)"
    else:
        factors = lora_factors(adapters, lora_rank, open_source, dtype)
        config, tensors = lora_from_factors(run, factors, dtype) if factors else (None, {})  # empty off rank 0
        kind = "lora (exact rank)" if lora_rank is None else f"lora (rank {lora_rank})"
    if folder is not None and config is not None:
        config.save_pretrained(str(folder))
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    layers = {
        name: {k: f[k] for k in ("exact_rank", "rank", "residual", "how")} for name, f in factors.items()
    }
    return {"peft_type": kind, "layers": layers}
