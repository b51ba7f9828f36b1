"""Run monitoring: metrics JSONL, TensorBoard scalars and the spectral views, a progress bar.

Only rank 0 writes. Gathering ZeRO-3 partitioned adapter parameters is a collective, so
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
from megaspec.model import adapters_of
from megaspec.train.checkpoint import CHECKPOINTS, read_latest
from megaspec.train.errors import out_of_space, write_failed

MAX_IMAGE_SIDE = 256
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


def position_map(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], max_side: int = MAX_IMAGE_SIDE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pooled |values| at (rows, cols) of an M x N grid, and which cells hold a position.

    The grid is reduced to at most max_side per side in index space (cell of row r is
    r * H // M), so the cost is O(n + H W) and no M x N tensor is ever made.
    """
    m, n = shape
    h, w = min(m, max_side), min(n, max_side)
    cell = (rows.long() * h // m) * w + cols.long() * w // n
    mag = torch.zeros(h * w).scatter_reduce_(0, cell, values.detach().float().abs(), reduce="amax")
    occupied = torch.zeros(h * w, dtype=torch.bool)
    occupied[cell] = True
    return mag.reshape(h, w), occupied.reshape(h, w)


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


def _render(mag: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
    """Occupied cells at 0.25 (a zero coefficient stays visible) up to 1.0 at the largest |c|."""
    top = float(mag.max())
    level = 0.25 + 0.75 * (mag / top if top > 0 else torch.zeros_like(mag))
    return torch.where(occupied, level, torch.zeros_like(mag))


def spectral_image(tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor | None:
    """A (3, H, W) image in [0, 1] of one adapter, or None when its method has no spatial view.

    Sparse spectra: each selected frequency (row u, col v) at its |c|; positions chosen by DHT
    energy (SSH's from_energy) in red, the random ones in cyan, all grey when not recorded.
    Low rank: |B A| in grey.
    """
    if {"rows", "cols", "coeffs"} <= tensors.keys():
        rows, cols, coeffs = tensors["rows"], tensors["cols"], tensors["coeffs"]
        if "from_energy" not in tensors:
            return _render(*position_map(rows, cols, coeffs, shape)).expand(3, -1, -1).clone()
        energy = tensors["from_energy"].bool()
        red = _render(*position_map(rows[energy], cols[energy], coeffs[energy], shape))
        cyan = _render(*position_map(rows[~energy], cols[~energy], coeffs[~energy], shape))
        return torch.stack([red, cyan, cyan])
    if {"lora_A", "lora_B"} <= tensors.keys() and shape[0] * shape[1] <= MAX_LOW_RANK_MAP_NUMEL:
        mag = low_rank_map(tensors["lora_A"], tensors["lora_B"])
        return _render(mag, torch.ones_like(mag, dtype=torch.bool)).expand(3, -1, -1).clone()
    return None


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

    def __init__(self, output_dir: str | Path, resume_step: int | None = None, flush_secs: int = 30) -> None:
        """With `resume_step` (a run resumed from that step's checkpoint), what was logged after it is dropped."""
        self.output_dir = Path(output_dir)
        self.enabled = rank() == 0
        self.world_size = world_size()
        self.writer = None
        self.metrics = None
        self.failed: set[str] = set()  # kinds of TensorBoard output that failed once (reported once)
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "metrics.jsonl"
            if resume_step is not None and path.exists():
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))
            # purge_step: TensorBoard hides events at and after it that the crashed run left behind
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), flush_secs=flush_secs, purge_step=purge)
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
        """One image per adapted layer (`spectral/positions/<layer>`); collective unless `tensors` is given."""
        if tensors is None:
            tensors = gathered_adapter_tensors(model)
        if not self.enabled:
            return []
        adapters = adapters_of(model)
        tags = layer_tags(list(adapters))
        written = []
        for name, adapter in adapters.items():
            with self._best_effort("images", step):
                image = spectral_image(tensors[name], adapter.shape)
                if image is not None:
                    tag = f"spectral/positions/{tags[name]}"
                    self.writer.add_image(tag, image.numpy(), step, dataformats="CHW")
                    written.append(tag)
        return written

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


def progress_bar(total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """A tqdm bar over training steps, shown on rank 0 only (refreshed at most once a second)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=rank() != 0, mininterval=1.0, dynamic_ncols=True)

