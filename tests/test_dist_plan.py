"""Collective planning: layer assignment, one-layer gathers, and a 2-rank ZeRO-3 plan against 1 process."""

from __future__ import annotations

import hashlib
import math
import os
import random
import threading

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from megaspec import AdapterConfig, apply_adapters
from megaspec.adapters import dense_weight
from megaspec.adapters.fourierft import FourierFTAdapter
from megaspec.adapters.ssh import SSHAdapter
from megaspec.distributed import assign_layers, gather_layer, is_partitioned, plan_adapters, plan_digest
from megaspec.model import adapters_of

from .conftest import tiny_config
from .distributed import run_ranks

CONFIG = AdapterConfig(method="ssh", n_coeffs=50)
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
}


# --- assign_layers ------------------------------------------------------------------------


def test_assign_layers_by_hand():
    # largest first, each to the least-loaded rank, ties to the lower rank:
    # 5->r0 [5,0], 4->r1 [5,4], 3->r1 [5,7], 3->r0 [8,7], 2->r1 [8,9], 1->r0 [9,9]
    assert assign_layers([5, 4, 3, 3, 2, 1], 2) == [0, 1, 1, 0, 1, 0]
    # q (64x64), v (32x64) of two decoder layers
    assert assign_layers([4096, 2048, 4096, 2048], 2) == [0, 0, 1, 1]


def test_assign_layers_edge_cases():
    assert assign_layers([], 4) == []
    assert assign_layers([3, 1, 2], 1) == [0, 0, 0]
    assert assign_layers([1, 3, 2], 8) == [2, 0, 1]  # more ranks than layers: one each, by size
    with pytest.raises(ValueError, match="world_size"):
        assign_layers([1], 0)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_assign_layers_balanced_and_deterministic(world_size):
    rng = random.Random(world_size)
    sizes = [rng.choice([4096 * 1024, 4096 * 14336, 1024 * 4096]) for _ in range(7 * 32)]
    owners = assign_layers(sizes, world_size)
    assert owners == assign_layers(list(sizes), world_size)
    loads = [sum(s for s, r in zip(sizes, owners, strict=True) if r == rank) for rank in range(world_size)]
    # greedy largest-first never leaves two ranks further apart than one layer
    assert max(loads) - min(loads) <= max(sizes)
    assert sum(loads) == sum(sizes)


# --- gather_layer and single-process planning ----------------------------------------------


def test_gather_layer_is_a_no_op_without_zero():
    layer = nn.Linear(8, 4)
    weight = layer.weight
    assert not is_partitioned(layer)
    with gather_layer(layer) as gathered:
        assert gathered is layer and layer.weight is weight and layer.weight.shape == (4, 8)


def test_gather_layer_and_plan_on_bitsandbytes_layers():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    plain = {f"l{i}": nn.Linear(64, 32, bias=False) for i in range(2)}
    quantized, dense = {}, {}
    for name, layer in plain.items():
        q = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4")
        quantized[name] = q.to("cpu")  # bitsandbytes quantizes on the move to a device
        assert not is_partitioned(quantized[name])
        with gather_layer(quantized[name]):
            dense[name] = nn.Linear(64, 32, bias=False)
            dense[name].weight.data.copy_(dense_weight(quantized[name]))
    on_quantized = {n: SSHAdapter(q, CONFIG, n, n_layers=2) for n, q in quantized.items()}
    on_dense = {n: SSHAdapter(d, CONFIG, n, n_layers=2) for n, d in dense.items()}
    assert plan_adapters(on_quantized)["digest"] == plan_adapters(on_dense)["digest"]


def _protocol_plans(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The planning protocol run by hand, in one process: plan_layer on each weight, then combine."""
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    adapters = {n: SSHAdapter(model.get_submodule(n), CONFIG, n, n_layers=len(names)) for n in names}
    results = {n: a.plan_layer(a.base.weight.detach().float()) for n, a in adapters.items()}
    return SSHAdapter.combine(adapters, results)


def test_plan_adapters_single_process_matches_the_protocol(tiny_model):
    expected = _protocol_plans(tiny_model)
    summary = apply_adapters(tiny_model, CONFIG).plan
    adapters = adapters_of(tiny_model)
    assert list(adapters) == list(expected)
    for name, adapter in adapters.items():
        for key, value in expected[name].items():
            assert torch.equal(adapter.plan_state()[key], value), (name, key)
    assert summary["layers"] == 4
    assert set(summary["planned_by"].values()) == {0}
    assert summary["peak_gathered_numel"] == 0  # nothing is partitioned, nothing is gathered
    layer_digests = "".join(plan_digest(n, expected[n]) for n in expected)
    assert summary["digest"] == hashlib.sha256(layer_digests.encode()).hexdigest()


def test_plan_adapters_groups_methods():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    fourier_config = AdapterConfig(method="fourierft", n_coeffs=30)

    def wrap():
        q = [n for n, _ in model.named_modules() if n.endswith("q_proj")]
        v = [n for n, _ in model.named_modules() if n.endswith("v_proj")]
        ssh = {n: SSHAdapter(model.get_submodule(n), CONFIG, n, n_layers=len(q)) for n in q}
        fourier = {n: FourierFTAdapter(model.get_submodule(n), fourier_config, n, n_layers=len(v)) for n in v}
        return ssh, fourier

    ssh, fourier = wrap()
    mixed = plan_adapters({n: a for pair in zip(ssh.items(), fourier.items(), strict=True) for n, a in pair})
    assert mixed["planned_by"] == {n: (0 if n in ssh else None) for n in mixed["planned_by"]}
    alone_ssh, alone_fourier = wrap()
    plan_adapters(alone_ssh)
    plan_adapters(alone_fourier)
    for mine, alone in ((ssh, alone_ssh), (fourier, alone_fourier)):
        for name in mine:
            assert plan_digest(name, mine[name].plan_state()) == plan_digest(name, alone[name].plan_state())


# --- SSH's global top-k without gathering every candidate -----------------------------------


def _thread_gather(world: int) -> list:
    """One all-gather function per fake rank; the ranks are threads that meet at a barrier."""
    slots: list = [None] * world
    barrier = threading.Barrier(world)

    def for_rank(rank: int):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    return [for_rank(r) for r in range(world)]


def _synthetic_ssh(seed: int, n_coeffs: int, min_per_layer: int) -> tuple[dict, dict]:
    """Meta SSH adapters of mixed shapes and sorted candidate lists full of tied scores."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 32), (32, 16), (8, 8), (24, 40), (16, 32), (40, 8), (32, 32)]
    config = AdapterConfig(method="ssh", n_coeffs=n_coeffs, min_per_layer=min_per_layer)
    adapters, results = {}, {}
    for i, (m, n) in enumerate(shapes):
        with torch.device("meta"):
            base = nn.Linear(n, m, bias=False)
        name = f"layer{i}"
        adapters[name] = SSHAdapter(base, config, name, n_layers=len(shapes))
        k = min(adapters[name].energy_budget(), m * n)
        scores = torch.randint(0, 6, (k,), generator=g).float() * 0.25  # six values: ties everywhere
        positions = torch.randperm(m * n, generator=g)[:k]
        order = torch.argsort(positions)
        scores, positions = scores[order], positions[order]
        order = torch.argsort(scores, descending=True, stable=True)
        results[name] = {"scores": scores[order], "positions": positions[order]}
    return adapters, results


@pytest.mark.parametrize("n_coeffs, min_per_layer", [(40, 3), (40, 40), (60, 1), (5, 0)])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ssh_two_stage_selection_plans_like_every_candidate(world, n_coeffs, min_per_layer):
    """Shrinking while planning, then the collective bisection, send just the picks, and combine agrees."""
    adapters, results = _synthetic_ssh(world * 100 + n_coeffs, n_coeffs, min_per_layer)
    expected = SSHAdapter.combine(adapters, results)
    names = list(adapters)
    owners = assign_layers([math.prod(adapters[n].shape) for n in names], world)
    budget = adapters[names[0]].energy_budget()
    floor = min(min_per_layer, budget // len(names))
    take = budget - floor * len(names)
    sent: list[dict] = [{} for _ in range(world)]
    held: list[int] = [0] * world

    def rank_main(rank: int, gather) -> None:
        local: dict = {}
        for name in names:
            if owners[names.index(name)] == rank:
                local[name] = results[name]
                local.update(SSHAdapter.shrink_results(adapters, local))
                pools = sum(max(r["scores"].numel() - floor, 0) for r in local.values())
                held[rank] = max(held[rank], pools)
        sent[rank] = SSHAdapter.select_results(adapters, local, gather)

    threads = [threading.Thread(target=rank_main, args=(r, g)) for r, g in enumerate(_thread_gather(world))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    gathered = {name: part[name] for part in sent for name in part}
    assert sorted(gathered) == sorted(names)
    plans = SSHAdapter.combine(adapters, gathered)
    for name in names:
        for key in expected[name]:
            assert torch.equal(plans[name][key], expected[name][key]), (world, name, key)
    # what travels is exactly the picks: every layer's floor plus the global top `take`
    floors = sum(min(floor, results[n]["scores"].numel()) for n in names)
    pool = sum(results[n]["scores"].numel() for n in names) - floors
    assert sum(r["scores"].numel() for r in gathered.values()) == floors + min(pool, take)
    # and while planning, no rank held more than its floors and `take` pool candidates
    assert max(held) <= take


def test_ssh_selection_names_a_layer_whose_energies_are_not_finite():
    adapters, results = _synthetic_ssh(0, 40, 3)
    results["layer2"]["scores"][-1] = float("nan")
    with pytest.raises(ValueError, match="layer layer2: DHT energies are negative or not finite"):
        SSHAdapter.shrink_results(adapters, results)


def test_plan_digest_sees_every_position():
    plan = {"rows": torch.tensor([0, 3, 5]), "cols": torch.tensor([1, 1, 2])}
    same = {"cols": torch.tensor([1, 1, 2]), "rows": torch.tensor([0, 3, 5])}
    moved = {"rows": torch.tensor([0, 3, 5]), "cols": torch.tensor([1, 1, 3])}
    assert plan_digest("a", plan) == plan_digest("a", same)
    assert plan_digest("a", plan) != plan_digest("a", moved)
    assert plan_digest("a", plan) != plan_digest("b", plan)


# --- 2 ranks under ZeRO-3 against 1 process -------------------------------------------------


def _targets(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")) and isinstance(m, nn.Linear)
    ]


def _weight_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of each target's full weight (gathered one layer at a time under ZeRO-3)."""
    digests = {}
    for name in _targets(model):
        layer = model.get_submodule(name)
        with gather_layer(layer):
            digests[name] = hashlib.sha256(layer.weight.detach().float().numpy().tobytes()).hexdigest()
    return digests


def _positions(model: nn.Module) -> dict[str, tuple[list[int], list[int]]]:
    return {n: (a.rows.tolist(), a.cols.tolist()) for n, a in adapters_of(model).items()}


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights into a possibly partitioned model, as from_pretrained does under ZeRO-3."""
    import deepspeed

    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                for key, p in params.items():
                    p.data.copy_(state[f"{prefix}.{key}" if prefix else key])


def _counting_plan_layer(calls: list[tuple[str, tuple[int, ...]]]) -> None:
    """Record (layer, weight shape) of every plan_layer call in this process."""
    original = SSHAdapter.plan_layer

    def counted(self, weight):
        calls.append((self.name, tuple(weight.shape)))
        return original(self, weight)

    SSHAdapter.plan_layer = counted


def _plan_on_ranks(weights_path: str) -> dict:
    """One rank: plan a ZeRO-3 model, a plain model, and a plain model whose rank 1 disagrees."""
    import deepspeed

    state = torch.load(weights_path)
    calls: list[tuple[str, tuple[int, ...]]] = []
    _counting_plan_layer(calls)
    out = {"rank": torch.distributed.get_rank()}

    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        zero = LlamaForCausalLM(tiny_config())
    _load(zero, state)
    weight = zero.get_submodule(_targets(zero)[0]).weight
    out["partitioned"] = (weight.numel(), tuple(weight.ds_shape))
    out["zero_weights"] = _weight_digests(zero)
    out["zero"] = apply_adapters(zero, CONFIG).plan
    out["zero_positions"] = _positions(zero)
    out["zero_calls"] = list(calls)

    calls.clear()
    plain = LlamaForCausalLM(tiny_config())
    plain.load_state_dict(state)
    out["plain"] = apply_adapters(plain, CONFIG).plan
    out["plain_positions"] = _positions(plain)
    out["plain_calls"] = list(calls)

    if out["rank"] == 1:
        combine = SSHAdapter.combine.__func__

        def skewed(cls, adapters, results):
            plans = combine(cls, adapters, results)
            last = list(plans)[-1]
            plans[last]["rows"] = (plans[last]["rows"] + 1) % adapters[last].shape[0]
            return plans

        SSHAdapter.combine = classmethod(skewed)
    other = LlamaForCausalLM(tiny_config())
    other.load_state_dict(state)
    try:
        apply_adapters(other, CONFIG)
        out["disagreement"] = None
    except RuntimeError as err:
        out["disagreement"] = str(err)
    return out


@pytest.mark.slow
def test_zero3_two_ranks_plan_like_one_process(tmp_path):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_config())
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    weights = _weight_digests(reference)
    summary = apply_adapters(reference, CONFIG).plan
    positions = _positions(reference)
    names = list(positions)
    sizes = {n: math.prod(a.shape) for n, a in adapters_of(reference).items()}
    owners = dict(zip(names, assign_layers([sizes[n] for n in names], 2), strict=True))
    assert set(owners.values()) == {0, 1}

    ranks = [r.value for r in run_ranks(_plan_on_ranks, 2, args=(str(tmp_path / "weights.pt"),), timeout=300)]

    for out in ranks:
        rank = out["rank"]
        # the ZeRO-3 weights really are partitioned, and hold the reference values when gathered
        assert out["partitioned"] == (0, (64, 64))
        assert out["zero_weights"] == weights
        for key in ("zero", "plain"):
            # the same positions, bit for bit, as the 1-process plan
            assert out[f"{key}_positions"] == positions, (rank, key)
            assert out[key]["digest"] == summary["digest"], (rank, key)
            assert out[key]["planned_by"] == owners
            # only the picks travel: 4 layers x 50 x energy ratio 0.5, fp32 score + int64 position each
            assert out[key]["results_bytes"] == summary["results_bytes"] == 100 * (4 + 8)
            # only the owner computes a layer's plan, on the full weight
            assert out[f"{key}_calls"] == [(n, (sizes[n] // 64, 64)) for n in names if owners[n] == rank]
        # every rank gathers every layer, one at a time: its peak is the largest single layer
        assert out["zero"]["peak_gathered_numel"] == max(sizes.values())
        assert out["plain"]["peak_gathered_numel"] == 0
        assert out["disagreement"] is not None
        assert out["disagreement"].startswith("ranks disagree on the adapter plan")
        assert names[-1] in out["disagreement"]


# --- the spawning helper itself ---------------------------------------------------------------


def _fail_on_rank_one(seconds: float) -> None:
    """Rank 1 raises; rank 0 is stuck (it would wait for rank 1 in the next collective)."""
    import time

    if os.environ["RANK"] == "1":
        raise ValueError("rank one gives up")
    time.sleep(seconds)


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


@pytest.mark.slow
def test_run_ranks_reports_a_failed_rank_and_kills_the_stuck_one():
    import time

    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        run_ranks(_fail_on_rank_one, 2, args=(600,), init=None, grace=2, timeout=120)
    message = str(failure.value)
    assert "rank 1: exit code 1" in message and "ValueError: rank one gives up" in message
    assert "rank 0: killed" in message
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_run_ranks_timeout_kills_every_rank():
    results = run_ranks(_sleep, 2, args=(600,), init=None, timeout=5, check=False)
    assert [r.returncode for r in results] == [None, None]
    assert all(4 < r.seconds < 60 for r in results)
