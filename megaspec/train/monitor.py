"""Run monitoring: metrics JSONL, tracker scalars and the spectral figures, a progress bar.

Only rank 0 writes. Scalars, histograms and images go to the `--report_to` trackers
(megaspec.train.trackers, TensorBoard by default); the figures (megaspec.train.figures) also go to
`<run>/figures/` as PNGs, which the run report embeds. Gathering ZeRO-3 partitioned adapter parameters is a collective, so
`gathered_adapter_tensors`, `RunLogger.log_spectral` and `RunLogger.log_spectral_images` must be
called on every rank (the others return after the gather); `log_scalars` never communicates.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from megaspec.distributed.comm import rank, world_size
from megaspec.distributed.gather import gather_params
from megaspec.model import adapters_of
from megaspec.train import figures
from megaspec.train.checkpoint import CHECKPOINTS, read_latest
from megaspec.train.errors import out_of_space, write_failed
from megaspec.train.trackers import open_trackers, tensorboard_scalars

MAX_IMAGE_SIDE = 256
# Spectrum images per image step: this many layers, evenly spread over depth, always the same ones
# (256-colour PNGs of 60-80 KiB; README "Monitoring" has the event-file sizes on an 80-layer model).
MAX_SPECTRUM_IMAGES = 6
# The W0 energy background is skipped for layers above this many elements (one fp32 FFT of it is made).
MAX_BACKGROUND_NUMEL = 1 << 28
FIGURES = "figures"  # PNG copies of the latest figures in the run folder
# Gather adapter parameters in chunks of at most this many elements: a handful of collectives
# per log step, and bounded memory for large low-rank adapters (LoRA on a 70B model is ~1e8).
GATHER_CHUNK_NUMEL = 1 << 25
# |B A| maps need the full product, computed by row blocks; skip layers larger than this.
MAX_LOW_RANK_MAP_NUMEL = 1 << 26


def layer_tags(names: list[str]) -> dict[str, str]:
    """Short TensorBoard tags: 'model.layers.0.self_attn.q_proj' -> 'layers.0.q_proj'; full names on a clash."""
    tags = {}
    for name in names:
        parts = name.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        if not digits:
            tags[name] = name
            continue
        keep = {max(digits[0] - 1, 0), *digits, len(parts) - 1}
        tags[name] = ".".join(part for i, part in enumerate(parts) if i in keep)
    if len(set(tags.values())) < len(tags):
        return {name: name for name in names}
    return tags


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def gathered_adapter_tensors(model: nn.Module, rank0_only: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """CPU fp32 copies of every adapter's trainable parameters, plus its plan buffers, by layer name.

    Collective under ZeRO-3: every rank must call it (deepspeed.zero.GatheredParameters with
    modifier_rank=None, nothing is written back). With rank0_only the other ranks take part in
    the gathers but get an empty dict.
    """
    adapters = adapters_of(model)
    keep = rank() == 0 or not rank0_only
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in adapters} if keep else {}
    chunks: list[list[tuple[str, str, nn.Parameter]]] = [[]]
    size = 0
    for name, adapter in adapters.items():
        for key, p in _trainable(adapter).items():
            if chunks[-1] and size + _numel(p) > GATHER_CHUNK_NUMEL:
                chunks.append([])
                size = 0
            chunks[-1].append((name, key, p))
            size += _numel(p)
    for chunk in chunks:
        with ExitStack() as stack:
            params = [p for _, _, p in chunk]
            if any(hasattr(p, "ds_id") for p in params):
                import deepspeed

                stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
            if keep:
                for name, key, p in chunk:
                    out[name][key] = p.detach().float().cpu().clone()
    if keep:
        for name, adapter in adapters.items():
            for key, buf in adapter.plan_state().items():
                out[name][key] = buf.detach().cpu().clone()
    return out


@torch.no_grad()
def low_rank_map(
    lora_a: torch.Tensor, lora_b: torch.Tensor, max_side: int = MAX_IMAGE_SIDE, block_rows: int = 1024
) -> torch.Tensor:
    """|B A| max-pooled to at most max_side per side, computed a block of rows at a time."""
    m, n = lora_b.shape[0], lora_a.shape[1]
    h, w = min(m, max_side), min(n, max_side)
    col_cell = torch.arange(n) * w // n
    out = torch.zeros(h, w)
    for start in range(0, m, block_rows):
        block = (lora_b[start : start + block_rows].float() @ lora_a.float()).abs()
        row_cell = (torch.arange(start, start + block.shape[0]) * h // m).unsqueeze(1)
        cell = (row_cell * w + col_cell.unsqueeze(0)).flatten()
        out.view(-1).scatter_reduce_(0, cell, block.flatten(), reduce="amax")
    return out


def layer_figure(tag: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], step: int,
                 background: np.ndarray | None = None) -> Any:
    """The figure of one adapter at `step`, or None when its method has no spatial view.

    Sparse spectra: each coefficient at its centred frequency over W0's energy (figures.spectrum_figure),
    by origin where the plan records it (SSH's from_energy). Low rank: |B A| max-pooled.
    """
    m, n = shape
    if {"rows", "cols", "coeffs"} <= tensors.keys():
        title = f"{tag} ({m}x{n}): {tensors['coeffs'].numel():,} coefficients, step {step}"
        return figures.spectrum_figure(title, shape, tensors["rows"], tensors["cols"], tensors["coeffs"],
                                       tensors.get("from_energy"), background)
    if {"lora_A", "lora_B"} <= tensors.keys() and m * n <= MAX_LOW_RANK_MAP_NUMEL:
        title = f"{tag} ({m}x{n}): |B A|, step {step}"
        return figures.low_rank_figure(title, shape, low_rank_map(tensors["lora_A"], tensors["lora_B"]))
    return None


def layer_energy(adapter: nn.Module) -> np.ndarray | None:
    """figures.energy_background of the weight the adapter's positions index (its base, S2FT's permuted), or None.

    Reads the base weight: under ZeRO-3 call it inside gather_params on every rank.
    """
    from megaspec.adapters import dense_weight

    kernel = getattr(adapter, "kernel", None)
    if kernel is None:
        return None
    with torch.no_grad():
        weight = dense_weight(adapter.base).float()
        if hasattr(adapter, "row_perm"):  # S2FT: positions live in the permuted (latent) domain
            weight = weight[adapter.row_perm.to(weight.device)][:, adapter.col_perm.to(weight.device)]
        return figures.energy_background(figures.weight_energy(weight, kernel))


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, else peak RSS (getrusage)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metrics key: 'loss' -> 'train/loss', 'eval_loss' -> 'eval/loss'."""
    if "/" in key:
        return key
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_") :]
    return "train/" + key


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _step_of(line: str) -> float:
    """The step of one metrics.jsonl line (a torn last line from a crash counts as after everything)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class RunLogger:
    """Writes `output_dir/metrics.jsonl` and TensorBoard events under `output_dir/tensorboard` (rank 0 only)."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None, flush_secs: int = 30,
                 report_to: str = "tensorboard", config: dict[str, Any] | None = None) -> None:
        """With `resume_step` (a run resumed from that step's checkpoint), what was logged after it is dropped.

        report_to: the trackers (megaspec.train.trackers); config: the run's settings, for W&B and MLflow.
        """
        self.output_dir = Path(output_dir)
        self.enabled = rank() == 0
        self.world_size = world_size()
        self.writer = None
        self.metrics = None
        self.failed: set[str] = set()  # kinds of TensorBoard output that failed once (reported once)
        self.norms: dict[int, dict[str, float]] = {}  # growth heatmap: step -> layer tag -> coefficient norm
        self.backgrounds: dict[str, np.ndarray | None] = {}  # W0 energy maps by layer (names kept on every rank)
        if self.enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "metrics.jsonl"
            if resume_step is not None and path.exists():
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))
            # purge_step: TensorBoard hides events at and after it that the crashed run left behind
            purge = None if resume_step is None else resume_step + 1
            if resume_step is not None:  # the heatmap goes on from what the run logged before
                self.norms = _norm_history(self.output_dir / "tensorboard", resume_step)
            self.writer = open_trackers(report_to, self.output_dir, config, flush_secs=flush_secs, purge_step=purge)
            self.metrics = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def log_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        """One metrics.jsonl line (with memory and world_size added) and one TensorBoard scalar per key."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        record.setdefault("memory", peak_memory_bytes())
        record.setdefault("world_size", self.world_size)
        record.setdefault("time", time.time())
        try:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        except OSError as exc:  # a full disk stops the run here, before its next checkpoint fails too
            raise write_failed(exc, "metrics.jsonl", self.output_dir, read_latest(self.output_dir / CHECKPOINTS)) from exc
        with self._best_effort("scalars", step):
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(scalar_tag(key), value, step)

    @contextlib.contextmanager
    def _best_effort(self, what: str, step: int) -> Iterator[None]:
        """TensorBoard output never ends a run: a failure is reported once per kind and the run goes on.

        Only a full disk is passed on (as WriteFailed), because the next checkpoint would fail too.
        """
        try:
            yield
        except Exception as exc:
            if out_of_space(exc, self.output_dir):
                raise write_failed(exc, f"TensorBoard {what}", self.output_dir,
                                   read_latest(self.output_dir / CHECKPOINTS)) from exc
            if what not in self.failed:
                self.failed.add(what)
                print(f"train: warning: TensorBoard {what} at step {step} not written ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); training goes on", file=sys.stderr, flush=True)

    def log_spectral(
        self, step: int, model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, float]:
        """Per-layer norm and max |value| of the trainable tensors, their histogram and global norm.

        Collective (gathers the adapters) unless `tensors` from gathered_adapter_tensors is
        given; returns the scalars written (empty on ranks other than 0).
        """
        if tensors is None:
            tensors = gathered_adapter_tensors(model)
        if not self.enabled:
            return {}
        adapters = adapters_of(model)
        tags = layer_tags(list(adapters))
        stats: dict[str, float] = {}
        values = []
        for name, adapter in adapters.items():
            trained = [tensors[name][key].flatten() for key in _trainable(adapter)]
            if not trained:
                continue
            flat = torch.cat(trained).double()
            values.append(flat)
            stats[f"spectral/norm/{tags[name]}"] = float(torch.linalg.vector_norm(flat))
            stats[f"spectral/max_abs/{tags[name]}"] = float(flat.abs().max()) if flat.numel() else 0.0
        if not values:
            return {}
        self.norms[int(step)] = {k.removeprefix("spectral/norm/"): v for k, v in stats.items() if k.startswith("spectral/norm/")}
        stats["spectral/global_norm"] = math.sqrt(sum(v**2 for k, v in stats.items() if k.startswith("spectral/norm/")))
        with self._best_effort("spectral scalars", step):
            for tag, value in stats.items():
                self.writer.add_scalar(tag, value, step)
        every = torch.cat(values)
        finite = every[torch.isfinite(every)]  # TensorBoard's histogram fails on inf/NaN ("The histogram is empty")
        if finite.numel():
            with self._best_effort("histogram", step):
                self.writer.add_histogram("spectral/coeffs", finite.numpy(), step)
        return stats

    def log_spectral_images(
        self, step: int, model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> list[str]:
        """Spectrum images of up to MAX_SPECTRUM_IMAGES layers (`spectral/positions/<layer>`) and the growth heatmap.

        Collective unless `tensors` is given; the first call for a layer also gathers its frozen
        weight once (every rank) for the W0 energy background. Returns the tags written.
        """
        if tensors is None:
            tensors = gathered_adapter_tensors(model)
        adapters = adapters_of(model)
        shown = figures.spectrum_layers(list(adapters), MAX_SPECTRUM_IMAGES)
        self._gather_backgrounds({name: adapters[name] for name in shown})
        if not self.enabled:
            return []
        tags = layer_tags(list(adapters))
        written = []
        for name in shown:
            with self._best_effort("images", step):
                fig = layer_figure(tags[name], tensors[name], adapters[name].shape, step, self.backgrounds.get(name))
                if fig is not None:
                    self._figure(f"spectral/positions/{tags[name]}", fig, step, f"spectrum/{tags[name]}.png",
                                 colours=figures.SPECTRUM_COLOURS)
                    written.append(f"spectral/positions/{tags[name]}")
        if self.norms:
            with self._best_effort("growth image", step):
                steps = sorted(self.norms)
                layers = [tags[name] for name in adapters if tags[name] in self.norms[steps[-1]]]
                grid = np.array([[self.norms[s].get(tag, np.nan) for s in steps] for tag in layers])
                self._figure("spectral/growth", figures.growth_figure(layers, steps, grid), step, "growth.png")
                written.append("spectral/growth")
        return written

    def log_allocation(self, model: nn.Module, step: int = 0) -> str | None:
        """The budget allocation at plan time (`spectral/allocation`, figures/allocation.png); rank 0, no collective.

        Plans are buffers, which ZeRO-3 leaves whole on every rank, so nothing is gathered.
        """
        if not self.enabled:
            return None
        with self._best_effort("allocation image", step):
            adapters = adapters_of(model)
            tags = layer_tags(list(adapters))
            counts = [figures.allocation_counts(a.plan_state(), a.trainable_count()) for a in adapters.values()]
            unit = "coefficients" if any("rows" in a.plan_state() for a in adapters.values()) else "trainable parameters"
            fig = figures.allocation_figure([tags[n] for n in adapters], [c[0] for c in counts], [c[1] for c in counts],
                                            origin_known=all(c[2] for c in counts), unit=unit)
            self._figure("spectral/allocation", fig, step, "allocation.png")
            return "spectral/allocation"
        return None

    def _figure(self, tag: str, fig: Any, step: int, png: str, colours: int | None = None) -> None:
        """One figure to the trackers (a PNG image at `step`) and to figures/<png> in the run folder (replaced whole).

        colours: palette size of the PNG (figures.figure_png); None keeps RGB.
        """
        import os

        data = figures.figure_png(figures.figure_rgb(fig), colours)
        self.writer.add_png(tag, data, step)
        path = self.output_dir / FIGURES / png
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _gather_backgrounds(self, adapters: dict[str, nn.Module]) -> None:
        """W0 energy maps of the layers not done yet (collective: every rank gathers the same weights, in order)."""
        for name, adapter in adapters.items():
            if name in self.backgrounds:
                continue
            self.backgrounds[name] = None
            if getattr(adapter, "kernel", None) is None or math.prod(adapter.shape) > MAX_BACKGROUND_NUMEL:
                continue
            with gather_params([adapter.base.weight]):
                if self.enabled:
                    try:
                        self.backgrounds[name] = layer_energy(adapter)
                    except Exception as exc:  # a missing background never costs the image, let alone the run
                        print(f"train: warning: no W0 energy background for {name} ({type(exc).__name__}: {exc})",
                              file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Push pending TensorBoard events to disk."""
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close both outputs (safe to call twice)."""
        if self.enabled and self.writer is not None:
            self.writer.close()
            self.metrics.close()
            self.writer = None
            self.enabled = False


def _norm_history(log_dir: Path, until: int) -> dict[int, dict[str, float]]:
    """The coefficient norms a resumed run logged up to step `until`, from its TensorBoard events (empty if unreadable)."""
    try:
        scalars = tensorboard_scalars(log_dir, "spectral/norm/")
    except Exception:
        return {}
    history: dict[int, dict[str, float]] = {}
    for tag, points in scalars.items():
        for step, value in points:
            if step <= until:
                history.setdefault(step, {})[tag.removeprefix("spectral/norm/")] = value
    return history


def progress_bar(total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """A tqdm bar over training steps, shown on rank 0 only (refreshed at most once a second)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=rank() != 0, mininterval=1.0, dynamic_ncols=True)

