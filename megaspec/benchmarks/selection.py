"""Wall time and peak memory of SSH's collective planning step, measured per layer and extrapolated to 70B.

Three measurements, each in a fresh process (peak RSS is per process; tracemalloc does not see torch):

1. one layer: SSHAdapter.plan_layer (the top-k DHT energies of the weight) on a real fp32 (or bf16)
   weight of each distinct LLaMA-3-70B projection shape; peak = VmHWM - VmRSS before planning,
   with the weight already allocated (so "peak extra" is what planning adds to it); for reference,
   the full energy map (dht2_energy) is timed and measured too;
2. global selection on one rank that planned every layer (the worst case): synthetic candidates of
   each layer go through SSHAdapter.shrink_results as plan_adapters feeds them, then
   select_results (the collective bisection, trivial on one rank) and combine (the random draws),
   as every rank runs it after the all-gather of the picks;
3. ranks: plan_adapters on a small ZeRO-3 model (4 layers of 2048 x 2048) on 1 and 2 CPU ranks
   (gloo), wall time and peak per rank.

Extrapolation to a whole model: layers are spread by megaspec.distributed.assign_layers; a rank's planning
time is the sum of its layers' measured times (max over ranks reported), its peak is its largest
layer's; every rank receives only the picks, floor(energy_ratio * n * L) candidates in all, 12 bytes
each (fp32 score + int64 position), before pickling; a rank holds at most that many plus one
layer's top-k while it plans. Agreeing on the picks takes 33 all-gathers of one integer per rank.
Gather time (ZeRO-3 all-gather of each layer) is not included: it depends on the network.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.benchmarks.common import decoder_linear_shapes, llama_config, run_rank_processes, table
from megaspec.config import AdapterConfig
from megaspec.distributed import assign_layers

CANDIDATE_BYTES = 12  # fp32 score + int64 flat position
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _status_kib(key: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return 1024 * _status_kib("VmRSS")


def peak_bytes(pid: int | str = "self") -> int:
    """High-water mark of a process's resident set size (this one by default; since start or the last reset_peak)."""
    return 1024 * _status_kib("VmHWM", pid)


def ssh_config(n_coeffs: int, energy_ratio: float) -> AdapterConfig:
    """SSH in global mode (the default): the energy budget of a layer is energy_ratio * n * L."""
    return AdapterConfig(method="ssh", n_coeffs=n_coeffs, energy_ratio=energy_ratio, selection="global")


def candidates_per_layer(n_coeffs: int, energy_ratio: float, n_layers: int) -> int:
    """floor(energy_ratio * n * L): what one layer's plan_layer keeps and sends (SSHAdapter.energy_budget)."""
    return math.floor(energy_ratio * n_coeffs * n_layers)


def _layer_worker(shape: tuple[int, int], dtype: str, n_coeffs: int, energy_ratio: float, n_layers: int, threads: int) -> dict[str, Any]:
    """In a fresh process: plan one layer of `shape` (out, in), return time and peak."""
    from megaspec.adapters import dense_weight
    from megaspec.adapters.ssh import SSHAdapter
    from megaspec.spectral import dht2_energy

    torch.set_num_threads(threads)
    m, n = shape
    with torch.device("meta"):
        base = nn.Linear(n, m, bias=False)
    base.weight = nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype)), requires_grad=False)
    adapter = SSHAdapter(base, ssh_config(n_coeffs, energy_ratio), "layer", n_layers=n_layers)
    out: dict[str, Any] = {"shape": f"{m}x{n}", "dtype": dtype, "weight_bytes": base.weight.numel() * base.weight.element_size(),
                           "fp32_bytes": 4 * m * n, "k": min(adapter.energy_budget(), m * n)}
    _warm_up()
    rss = rss_bytes()
    out["peak_reset"] = reset_peak()
    start = time.perf_counter()
    energy = dht2_energy(dense_weight(base))  # the full energy map, for reference: plan_layer avoids it
    out["energy_s"] = time.perf_counter() - start
    out["energy_peak_extra"] = peak_bytes() - rss
    del energy
    reset_peak()
    rss = rss_bytes()
    start = time.perf_counter()
    result = adapter.plan_layer(dense_weight(base))
    out["plan_layer_s"] = time.perf_counter() - start
    out["peak_extra"] = peak_bytes() - rss
    out["result_bytes"] = sum(t.numel() * t.element_size() for t in result.values())
    return out


def _warm_up() -> None:
    """Run the planning ops once on a small tensor so that lazy library set-up is not counted as peak."""
    from megaspec.spectral import dht2_energy

    torch.topk(dht2_energy(torch.randn(64, 128)).flatten().double(), 16)


def _combine_worker(shapes: list[tuple[int, int]], n_coeffs: int, energy_ratio: float, threads: int) -> dict[str, Any]:
    """In a fresh process: shrink, select and combine over synthetic sorted candidates of every layer."""
    from megaspec.adapters.ssh import SSHAdapter

    torch.set_num_threads(threads)
    config = ssh_config(n_coeffs, energy_ratio)
    adapters = {}
    for i, (m, n) in enumerate(shapes):
        with torch.device("meta"):
            base = nn.Linear(n, m, bias=False)
        adapters[f"layer{i}"] = SSHAdapter(base, config, f"layer{i}", n_layers=len(shapes))
    g = torch.Generator().manual_seed(0)
    reset_peak()
    rss = rss_bytes()
    local: dict[str, Any] = {}
    produced = held = 0
    shrink_s = 0.0
    for name, adapter in adapters.items():  # as plan_adapters: one planned layer at a time
        total = math.prod(adapter.shape)
        k = min(adapter.energy_budget(), total)
        scores = torch.rand(k, generator=g).sort(descending=True).values
        local[name] = {"scores": scores, "positions": torch.randint(0, total, (k,), generator=g)}
        produced += k
        start = time.perf_counter()
        local.update(SSHAdapter.shrink_results(adapters, local))
        shrink_s += time.perf_counter() - start
        held = max(held, sum(r["scores"].numel() for r in local.values()))
    start = time.perf_counter()
    picks = SSHAdapter.select_results(adapters, local, lambda obj: [obj])
    plans = SSHAdapter.combine(adapters, picks)
    combine_s = time.perf_counter() - start
    return {"layers": len(shapes), "candidates": produced, "held": held,
            "received_bytes": sum(t.numel() * t.element_size() for r in picks.values() for t in r.values()),
            "shrink_s": shrink_s, "combine_s": combine_s, "peak_extra": peak_bytes() - rss,
            "coefficients": sum(p["rows"].numel() for p in plans.values())}


def picked_candidates(sizes: list[int], n_coeffs: int, energy_ratio: float) -> int:
    """Candidates all-gathered by the two-stage selection: every layer's floor plus the global top `take`."""
    k = candidates_per_layer(n_coeffs, energy_ratio, len(sizes))
    floor = min(AdapterConfig().min_per_layer, k // len(sizes))
    floors = sum(min(floor, size) for size in sizes)
    pools = sum(min(k, size) for size in sizes) - floors
    return floors + min(pools, k - floor * len(sizes))


def in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    """fn(*args) in a new interpreter (spawn), so its peak RSS is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def model_layers(model: str, targets: tuple[str, ...] = PROJECTIONS, **overrides: Any) -> list[tuple[str, tuple[int, int]]]:
    """(name, (out, in)) of every targeted projection of a LLaMA model, in layer order."""
    config = llama_config(model, **overrides)
    shapes = decoder_linear_shapes(config)
    return [(f"layers.{i}.{t}", shapes[t]) for i in range(config.num_hidden_layers) for t in targets]


def extrapolate(layers: list[tuple[str, tuple[int, int]]], measured: dict[str, dict[str, Any]], world_sizes: tuple[int, ...],
                n_coeffs: int, energy_ratio: float) -> list[dict[str, Any]]:
    """Per world size: max rank planning time, peak, and candidate volumes, from per-shape measurements."""
    sizes = [m * n for _, (m, n) in layers]
    keys = [f"{m}x{n}" for _, (m, n) in layers]
    k = candidates_per_layer(n_coeffs, energy_ratio, len(layers))
    rows = []
    for world in world_sizes:
        owners = assign_layers(sizes, world)
        time_per_rank = [0.0] * world
        peak_per_rank = [0] * world
        for key, owner in zip(keys, owners, strict=True):
            time_per_rank[owner] += measured[key]["plan_layer_s"]
            peak_per_rank[owner] = max(peak_per_rank[owner], measured[key]["peak_extra"] + measured[key]["weight_bytes"])
        biggest = max(measured[key]["fp32_bytes"] for key in set(keys))
        rows.append({
            "layers": len(layers), "world_size": world, "candidates_per_layer": k,
            "max_rank_s": max(time_per_rank), "min_rank_s": min(time_per_rank),
            "peak_per_rank": max(peak_per_rank), "peak_over_layer_fp32": max(peak_per_rank) / biggest,
            "allgather_received": picked_candidates(sizes, n_coeffs, energy_ratio) * CANDIDATE_BYTES,
            "before_received": sum(min(k, size) for size in sizes) * CANDIDATE_BYTES,
        })
    return rows


def measure_layers(shapes: list[tuple[int, int]], dtype: str, n_coeffs: int, energy_ratio: float, n_layers: int,
                   threads: int) -> dict[str, dict[str, Any]]:
    """plan_layer time and peak of each distinct shape, each in a fresh process."""
    out = {}
    for m, n in dict.fromkeys(shapes):
        out[f"{m}x{n}"] = in_fresh_process(_layer_worker, (m, n), dtype, n_coeffs, energy_ratio, n_layers, threads)
    return out


# --- 1 vs 2 ranks under ZeRO-3 ----------------------------------------------------------------------


def _rank_main(spec_path: str) -> None:
    """One rank of the ZeRO-3 measurement: build a partitioned stack of linears, plan SSH, write JSON."""
    import deepspeed

    from megaspec.adapters.ssh import SSHAdapter
    from megaspec.distributed import plan_adapters

    spec = json.loads(Path(spec_path).read_text())
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        layers = [nn.Linear(spec["width"], spec["width"], bias=False) for _ in range(spec["layers"])]
    for layer in layers:
        layer.requires_grad_(False)
    config = ssh_config(spec["n_coeffs"], spec["energy_ratio"])
    adapters = {f"layer{i}": SSHAdapter(layer, config, f"layer{i}", n_layers=len(layers)) for i, layer in enumerate(layers)}
    _warm_up()
    torch.distributed.barrier()
    reset_peak()
    rss = rss_bytes()
    start = time.perf_counter()
    info = plan_adapters(adapters)
    seconds = time.perf_counter() - start
    result = {"rank": rank, "world_size": torch.distributed.get_world_size(), "plan_s": seconds,
              "peak_extra": peak_bytes() - rss, "digest": info["digest"], "peak_gathered_numel": info["peak_gathered_numel"],
              "planned_here": sum(1 for owner in info["planned_by"].values() if owner == rank)}
    Path(spec["out"]).joinpath(f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def ranks_run(world_size: int, layers: int = 4, width: int = 2048, n_coeffs: int = 750, energy_ratio: float = 0.5,
              timeout: float = 900.0) -> list[dict[str, Any]]:
    """plan_adapters on `world_size` local CPU ranks (gloo, one thread each); one result per rank."""
    spec = {"layers": layers, "width": width, "n_coeffs": n_coeffs, "energy_ratio": energy_ratio}
    return run_rank_processes("megaspec.benchmarks.selection", spec, world_size, "ZeRO-3 planning run", timeout)


def run(model: str = "llama-3-70b", dtype: str = "float32", n_coeffs: int = 750, energy_ratio: float = 0.5,
        world_sizes: tuple[int, ...] = (1, 8, 16, 64), threads: int = 2, rank_sizes: tuple[int, ...] = (1, 2),
        rank_layers: int = 4, rank_width: int = 2048, combine: bool = True, **overrides: Any) -> dict[str, list[dict[str, Any]]]:
    """All three measurements and the extrapolation, as tables."""
    all_layers = model_layers(model, PROJECTIONS, **overrides)
    qv_layers = model_layers(model, ("q_proj", "v_proj"), **overrides)
    measured = measure_layers([s for _, s in all_layers], dtype, n_coeffs, energy_ratio, len(all_layers), threads)
    layer_rows = list(measured.values())
    for row in layer_rows:
        row["peak_over_layer_fp32"] = (row["peak_extra"] + row["weight_bytes"]) / row["fp32_bytes"]
    model_rows = []
    for targets, layers in (("all 7", all_layers), ("q,v", qv_layers)):
        for row in extrapolate(layers, measured, world_sizes, n_coeffs, energy_ratio):
            model_rows.append({"model": model, "targets": targets, **row})
    combine_rows = []
    if combine:
        for targets, layers in (("q,v", qv_layers), ("all 7", all_layers)):
            row = in_fresh_process(_combine_worker, [s for _, s in layers], n_coeffs, energy_ratio, threads)
            combine_rows.append({"model": model, "targets": targets, **row})
    rank_rows = []
    for world in rank_sizes:
        for r in ranks_run(world, rank_layers, rank_width, n_coeffs, energy_ratio):
            rank_rows.append({"layers": f"{rank_layers}x{rank_width}x{rank_width}", **r})
    return {"layer": layer_rows, "model": model_rows, "combine": combine_rows, "ranks": rank_rows}


LAYER_COLUMNS = [
    ("shape", "shape (out x in)", ""), ("dtype", "dtype", ""), ("weight_bytes", "weight", "bytes"), ("k", "top-k", ",d"),
    ("plan_layer_s", "plan_layer s", ".2f"), ("peak_extra", "plan_layer peak extra", "bytes"),
    ("energy_s", "ref: dht2_energy s", ".2f"), ("energy_peak_extra", "ref: dht2_energy peak extra", "bytes"),
    ("peak_over_layer_fp32", "(weight + extra) / fp32 layer", ".2f"),
]
MODEL_COLUMNS = [
    ("model", "model", ""), ("targets", "targets", ""), ("layers", "L", "d"), ("world_size", "ranks", "d"),
    ("candidates_per_layer", "cand./layer", ",d"), ("max_rank_s", "max rank s", ".1f"), ("min_rank_s", "min rank s", ".1f"),
    ("peak_per_rank", "peak/rank", "bytes"), ("peak_over_layer_fp32", "/ largest fp32 layer", ".2f"),
    ("allgather_received", "picks all-gathered", "bytes"), ("before_received", "every top-k (before)", "bytes"),
]
COMBINE_COLUMNS = [
    ("model", "model", ""), ("targets", "targets", ""), ("layers", "L", "d"), ("candidates", "candidates", ",d"),
    ("held", "most held", ",d"), ("received_bytes", "picks all-gathered", "bytes"), ("shrink_s", "shrink s", ".2f"),
    ("combine_s", "select + combine s", ".2f"), ("peak_extra", "peak extra", "bytes"), ("coefficients", "coefficients", ",d"),
]
RANK_COLUMNS = [
    ("layers", "model", ""), ("world_size", "ranks", "d"), ("rank", "rank", "d"), ("planned_here", "layers planned", "d"),
    ("plan_s", "plan_adapters s", ".2f"), ("peak_extra", "peak extra", "bytes"), ("peak_gathered_numel", "peak gathered numel", ",d"),
    ("digest", "plan digest", ""),
]


def format_table(result: dict[str, list[dict[str, Any]]]) -> str:
    """The four tables, titled."""
    parts = [("one layer, fresh process each", result["layer"], LAYER_COLUMNS),
             ("whole model, extrapolated (assign_layers; time = max rank load)", result["model"], MODEL_COLUMNS),
             ("global selection, one rank planning every layer (synthetic candidates)", result["combine"], COMBINE_COLUMNS),
             ("plan_adapters under ZeRO-3, CPU ranks (gloo)", result["ranks"], RANK_COLUMNS)]
    out = []
    for title, rows, columns in parts:
        if rows:
            shown = [{**r, "digest": r["digest"][:12]} if "digest" in r else r for r in rows]
            out.append(f"{title}\n{table(shown, columns)}")
    return "\n\n".join(out)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
