"""S2FT: the plan against naive oracles, the permuted update against the dense FourierFT one, the
gradient estimate against autograd, the lifecycle on a tiny LLaMA, and ZeRO-3 on 2 ranks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

from megaspec import AdapterConfig, apply_adapters, load_adapter, merge_adapters, save_adapter
from megaspec.adapters.base import layer_generator
from megaspec.adapters.s2ft import half_plane_size, sample_without_replacement
from megaspec.calibrate import DEFAULT_GROUP_BYTES, calibrate_adapters, estimate_groups, estimate_updates
from megaspec.model import adapters_of
from megaspec.spectral import dense_update

from .conftest import TARGETS, batch, tiny_config, train, zero3_config, zero3_tiny_llama
from .distributed import run_ranks
from .launcher import check, losses, run_train
from .test_param_counts import llama31_8b_meta

CONFIG = AdapterConfig(method="s2ft", n_coeffs=120, target_modules=TARGETS)
SHAPES = [(64, 64), (32, 64), (128, 64), (7, 5), (6, 9)]


def halves(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Two calibration micro-batches of 2 sequences (what each of 2 ranks would take)."""
    return [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in (0, 2)]


# --- naive oracles -------------------------------------------------------------------------


def naive_greedy(points: np.ndarray, start: int) -> list[int]:
    """Algorithm 1 of the paper as written: from `start`, append the nearest unvisited row."""
    order, left = [start], set(range(len(points))) - {start}
    while left:
        here = points[order[-1]]
        order.append(min(sorted(left), key=lambda j: np.linalg.norm(points[j] - here)))
        left.remove(order[-1])
    return order


def naive_prior(latent: np.ndarray, gamma: float) -> np.ndarray:
    """|FFT2|^gamma on the rfft grid (v <= N/2), zero at every position whose conjugate twin comes first."""
    m, n = latent.shape
    power = np.abs(np.fft.fft2(latent)) ** gamma
    h = n // 2 + 1
    weights = power[:, :h] + 1e-12 * power.max()
    for u in range(m):
        for v in range(h):
            twin_u, twin_v = (-u) % m, (-v) % n
            if (twin_v, twin_u) < (v, u):  # keep the lexicographically first of each twin pair
                weights[u, v] = 0.0
    return weights


def standalone(shape: tuple[int, int], seed: int = 0) -> nn.Module:
    """One float64 S2FT adapter planned from a random estimate, with random coefficients."""
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.proj = nn.Linear(shape[1], shape[0], bias=False, dtype=torch.float64)
    apply_adapters(holder, AdapterConfig(method="s2ft", n_coeffs=min(10, half_plane_size(*shape)), target_modules=["proj"]),
                   defer_calibration=True)
    adapter = holder.proj.to(torch.float64)
    estimate = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    adapter.set_plan(adapter.plan_from_estimate(estimate))
    with torch.no_grad():
        adapter.coeffs.copy_(torch.randn(adapter.coeffs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    return adapter


# --- the plan ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_plan_follows_the_papers_steps(shape):
    """Permutations: greedy nearest neighbour from seeded starts; positions: the half-plane power prior."""
    adapter = standalone(shape)
    m, n = shape
    estimate = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    plan = adapter.plan_from_estimate(estimate)
    generator = layer_generator(adapter.config.seed, adapter.name)
    start_row, start_col = (int(torch.randint(k, (1,), generator=generator)) for k in (m, n))
    assert plan["row_perm"].tolist() == naive_greedy(estimate.numpy(), start_row)
    assert plan["col_perm"].tolist() == naive_greedy(estimate.numpy().T, start_col)
    for key in ("row", "col"):
        perm, inv = plan[f"{key}_perm"], plan[f"inv_{key}_perm"]
        assert sorted(perm.tolist()) == list(range(perm.numel()))
        assert torch.equal(perm[inv], torch.arange(perm.numel()))
    latent = estimate[plan["row_perm"]][:, plan["col_perm"]].numpy()
    weights = torch.from_numpy(naive_prior(latent, 1.5).reshape(-1))
    picked = torch.multinomial(weights, adapter.config.n_coeffs, replacement=False, generator=generator)
    h = n // 2 + 1
    expected = sorted(((picked // h) * n + picked % h).tolist())
    assert (plan["rows"] * n + plan["cols"]).tolist() == expected
    flat = set(expected)
    assert all(((-u) % m) * n + (-v) % n not in flat - {u * n + v} for u, v in zip(plan["rows"].tolist(), plan["cols"].tolist(), strict=True))
    assert bool(plan["calibrated"])


def test_half_plane_size_counts_distinct_bases():
    for m, n in [(4, 6), (5, 7), (4, 7), (5, 6), (1, 1), (2, 2)]:
        twins = {min((u, v), ((-u) % m, (-v) % n)) for u in range(m) for v in range(n)}
        assert half_plane_size(m, n) == len(twins)


def test_exponential_race_samples_the_prior():
    """The bounded path (chunks, running top-n) draws the first position with probability w_i / sum w."""
    w = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    draws = 4000
    first = [int(sample_without_replacement(lambda a, b: w[a:b], 5, 1, generator, chunk=2)[0]) for _ in range(draws)]
    freq = np.bincount(first, minlength=5) / draws
    expected = (w / w.sum()).numpy()
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / draws) + 1e-12), freq
    every = sample_without_replacement(lambda a, b: w[a:b], 5, 4, generator, chunk=2)
    assert sorted(every.tolist()) == [0, 2, 3, 4]  # zero weight is never drawn while others remain


# --- the update ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_permuted_update_is_fourierft_in_the_latent_domain(shape):
    adapter = standalone(shape)
    dense = adapter.delta_weight()
    assert dense.dtype == torch.float64 and dense.abs().max() > 1e-3
    latent = dense_update(adapter.coeffs.detach(), adapter.rows, adapter.cols, shape, "fourier") * adapter.scale
    assert adapter.scale == math.sqrt(shape[0] * shape[1])
    torch.testing.assert_close(dense[adapter.row_perm][:, adapter.col_perm], latent, atol=1e-12, rtol=0)
    x = torch.randn(5, 3, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(adapter.delta(x), x @ dense.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(adapter(x), adapter.base(x) + x @ dense.T, atol=1e-10, rtol=0)
    rows = torch.randperm(shape[0], generator=torch.Generator().manual_seed(4))[: max(1, shape[0] // 3)]
    torch.testing.assert_close(adapter.delta_weight(rows), dense[rows], atol=1e-12, rtol=0)


# --- the estimate --------------------------------------------------------------------------


def test_gradient_estimate_is_minus_the_accumulated_gradient(tiny_model):
    oracle = copy.deepcopy(tiny_model)
    apply_adapters(tiny_model, CONFIG, defer_calibration=True)
    tiny_model.train()
    tiny_model.model.layers[1].eval()  # mixed modes come back as they were, module by module
    modes = [m.training for m in tiny_model.modules()]
    adapters = adapters_of(tiny_model)
    sums, count = estimate_updates(tiny_model, adapters, halves(batch()))
    assert count == 2 and [m.training for m in tiny_model.modules()] == modes
    for p in oracle.parameters():
        p.requires_grad_(True)
    for micro in halves(batch()):
        oracle(**micro).loss.backward()
    for name in adapters:
        grad = oracle.get_submodule(name).weight.grad
        torch.testing.assert_close(sums[name], -grad, atol=1e-6, rtol=1e-5)
    for adapter in adapters.values():
        assert adapter.coeffs.requires_grad and adapter.coeffs.grad is None
        assert not adapter.base.weight.requires_grad and adapter.base.weight.grad is None


def oracle_plans(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The plans as calibrate_adapters made them before layer groups: every layer's buffer in one set of passes."""
    adapters = adapters_of(model)
    sums, _ = estimate_updates(model, adapters, batches)
    return {name: adapters[name].plan_from_estimate(sums[name]) for name in adapters}


# q, k, v, down of one layer: 16384 + 8192 + 8192 + 32768 fp32 bytes
@pytest.mark.parametrize(("group_bytes", "groups"), [(1, 8), (40_000, 4), (65_536, 2), (DEFAULT_GROUP_BYTES, 1)])
def test_layer_groups_give_the_one_pass_plan(tiny_model, group_bytes, groups):
    """Each group takes its own passes and holds only its buffers; estimates and plans equal the one-pass ones."""
    apply_adapters(tiny_model, CONFIG, defer_calibration=True)
    batches = halves(batch())
    adapters = adapters_of(tiny_model)
    oracle = oracle_plans(tiny_model, batches)
    everything, _ = estimate_updates(tiny_model, adapters, batches)
    split = estimate_groups({name: a.shape for name, a in adapters.items()}, group_bytes)
    assert len(split) == groups and [n for g in split for n in g] == list(adapters)
    for group in split:
        sums, _ = estimate_updates(tiny_model, {n: adapters[n] for n in group}, batches)
        assert sorted(sums) == sorted(group)
        held = sum(t.numel() * t.element_size() for t in sums.values())
        assert held <= group_bytes or len(group) == 1
        for name, estimate in sums.items():
            assert torch.equal(estimate, everything[name]), name
    info = calibrate_adapters(tiny_model, iter(batches), group_bytes=group_bytes)  # a one-shot iterator is enough
    assert info["calibration"]["groups"] == groups and info["calibration"]["batches"] == 2
    assert all(p.grad is None for p in tiny_model.parameters())  # no group's passes reach any parameter
    assert info["calibration"]["max_group_bytes"] == max(sum(4 * adapters[n].shape[0] * adapters[n].shape[1] for n in g) for g in split)
    for name, adapter in adapters.items():
        for key, buf in adapter.plan_state().items():
            assert torch.equal(buf, oracle[name][key]), (name, key)


def test_group_bytes_must_be_positive(tiny_model):
    apply_adapters(tiny_model, CONFIG, defer_calibration=True)
    with pytest.raises(ValueError, match="group_bytes=0 must be positive"):
        calibrate_adapters(tiny_model, halves(batch()), group_bytes=0)


# --- the lifecycle -------------------------------------------------------------------------


def test_lifecycle(tiny_model, tmp_path):
    ids = batch()
    with torch.no_grad():
        before = tiny_model(ids).logits
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    summary = apply_adapters(tiny_model, CONFIG, calibration=halves(ids))
    assert len(summary.layers) == 8 and summary.trainable == 8 * 120
    assert summary.plan["calibration"]["batches"] == 2
    q = tiny_model.model.layers[0].self_attn.q_proj
    assert bool(q.calibrated) and not torch.equal(q.row_perm, torch.arange(64))
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, before), "delta must be exactly zero at step 0"

    out = train(tiny_model, ids)
    assert out[-1] < out[0] - 0.1, out
    for name, p in tiny_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name.replace(".base.", ".")])
    with torch.no_grad():
        adapted = tiny_model(ids).logits

    save_adapter(tiny_model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj."
    assert sorted(k[len(prefix) :] for k in saved if k.startswith(prefix)) == [
        "calibrated", "coeffs", "col_perm", "cols", "inv_col_perm", "inv_row_perm", "row_perm", "rows"]
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(tiny_config()).eval()
    load_adapter(fresh, tmp_path / "adapter")  # no calibration: the saved plan is used as is
    torch.manual_seed(0)
    provisional = LlamaForCausalLM(tiny_config()).eval()
    apply_adapters(provisional, CONFIG, defer_calibration=True)
    load_adapter(provisional, tmp_path / "adapter")  # replaces the provisional plan in place
    for model in (fresh, provisional):
        for name, adapter in adapters_of(model).items():
            for key, buf in adapter.plan_state().items():
                assert torch.equal(buf, saved[f"{name}.{key}"]), (name, key)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, adapted, atol=0, rtol=0)
    with torch.no_grad():
        merge_adapters(fresh)
        assert not adapters_of(fresh)
        torch.testing.assert_close(fresh(ids).logits, adapted, atol=1e-5, rtol=0)


def test_calibration_is_required_and_the_provisional_plan_is_inert(tiny_model):
    with pytest.raises(ValueError, match="plans from data"):
        apply_adapters(tiny_model, CONFIG)
    assert not adapters_of(tiny_model), "refused before any surgery"
    with torch.no_grad():
        before = tiny_model(batch()).logits
    apply_adapters(tiny_model, CONFIG, defer_calibration=True)
    for adapter in adapters_of(tiny_model).values():
        m, n = adapter.shape
        assert not bool(adapter.calibrated) and not adapter.coeffs.any()
        assert torch.equal(adapter.row_perm, torch.arange(m)) and torch.equal(adapter.col_perm, torch.arange(n))
        assert len(set((adapter.rows * n + adapter.cols).tolist())) == adapter.coeffs.numel()
    with torch.no_grad():
        assert torch.equal(tiny_model(batch()).logits, before)


def test_bad_configs(tiny_model):
    with pytest.raises(ValueError, match="half-plane"):
        apply_adapters(tiny_model, AdapterConfig(method="s2ft", n_coeffs=32 * 64 // 2 + 3, target_modules=["k_proj"]), defer_calibration=True)
    with pytest.raises(ValueError, match="zero coefficients"):
        apply_adapters(tiny_model, AdapterConfig(method="s2ft", init="gaussian"), defer_calibration=True)
    with pytest.raises(ValueError, match="s2ft_estimate_steps"):
        apply_adapters(tiny_model, AdapterConfig(method="s2ft", s2ft_estimate_steps=0), defer_calibration=True)


def test_llama31_8b_count_on_meta():
    model = llama31_8b_meta()
    summary = apply_adapters(model, AdapterConfig(method="s2ft", n_coeffs=1000, target_modules=["q_proj", "v_proj"]))
    assert summary.trainable == 64_000 and summary.nominal  # as FourierFT (docs/methods.md §3): n per layer
    q = model.model.layers[0].self_attn.q_proj
    assert {k: tuple(v.shape) for k, v in q.plan_state().items()} == {k: tuple(v.shape) for k, v in q.nominal_plan().items()}


# --- ZeRO-3 on 2 ranks against 1 process -----------------------------------------------------

ZERO3_STEPS = 3


def _zero3_run(weights_path: str) -> dict:
    """One rank: a partitioned tiny LLaMA, calibrated through engine.module on this rank's half (one layer per group), then trained."""
    import deepspeed

    state = torch.load(weights_path)
    rank = torch.distributed.get_rank()
    ds_config = zero3_config(2e-2)
    model = zero3_tiny_llama(ds_config, state)
    apply_adapters(model, CONFIG, defer_calibration=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    coeffs = model.model.layers[0].self_attn.q_proj.coeffs
    info = calibrate_adapters(engine, [halves(batch())[rank]], group_bytes=1)
    plans = {n: {k: v.clone() for k, v in a.plan_state().items()} for n, a in adapters_of(model).items()}
    out = []
    for _ in range(ZERO3_STEPS):
        ids = batch()[2 * rank : 2 * rank + 2]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    released = model.model.layers[0].self_attn.q_proj.base.weight.numel() == 0
    same_param = coeffs is model.model.layers[0].self_attn.q_proj.coeffs
    return {"losses": out, "plans": plans, "info": info, "released": released, "same_param": same_param}


@pytest.mark.slow
def test_zero3_two_ranks_match_one_process(tmp_path):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_config())
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    ranks = [r.value for r in run_ranks(_zero3_run, 2, args=(str(tmp_path / "weights.pt"),), timeout=400)]
    summary = apply_adapters(reference, CONFIG, calibration=halves(batch()))
    for out in ranks:
        assert out["released"] and out["same_param"]
        assert out["info"]["digest"] == summary.plan["digest"]  # the reference took one group
        assert out["info"]["calibration"]["groups"] == 8 and summary.plan["calibration"]["groups"] == 1
        assert set(out["info"]["calibration"]["planned_by"].values()) == {0, 1}
        for name, adapter in adapters_of(reference).items():
            for key, buf in adapter.plan_state().items():
                assert torch.equal(out["plans"][name][key], buf), (name, key)
    single = train(reference, batch(), steps=ZERO3_STEPS)
    two = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    np.testing.assert_allclose(two, single, rtol=0, atol=1e-5)
    assert single[-1] < single[0]


# --- the training job: 1 rank, 2 ranks, resumed -------------------------------------------------

STEPS = 6


def _args(config, out) -> list[str]:
    return ["--ds_config", str(config), "--method", "s2ft", "--n_coeffs", "200", "--s2ft_estimate_steps", "2",
            "--max_steps", str(STEPS), "--eval_every", "0", "--save_every", "3", "--image_every", str(STEPS),
            "--output_dir", str(out)]


def _plan(run_dir) -> dict[str, torch.Tensor]:
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if not k.endswith(".coeffs")}


@pytest.mark.slow
def test_training_job_one_rank_two_ranks_and_resume(batch8_config, tmp_path):
    two = tmp_path / "two"
    proc = check(run_train(_args(batch8_config, two), ranks=2))
    assert "s2ft plan calibrated on 2 micro-batches per rank" in proc.stdout
    one = tmp_path / "one"
    assert run_train([*_args(batch8_config, one), "--halt_at_step", "3"], ranks=1).returncode == 75
    proc = check(run_train([*_args(batch8_config, one), "--resume"], ranks=1))
    output = proc.stdout + proc.stderr
    assert "resumed from" in output and "plan restored from" in output and "calibrated on" not in output
    assert _plan(one).keys() == _plan(two).keys()
    for key, value in _plan(one).items():
        assert torch.equal(value, _plan(two)[key]), key
    assert all(v.item() for k, v in _plan(one).items() if k.endswith(".calibrated"))
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    # the engine checkpoint holds the module's buffers too, but resuming reads the plan from adapter/
    engine_states = list((one / "checkpoints").glob("step-*/engine/*/*model_states.pt"))
    module = torch.load(engine_states[0], map_location="cpu", weights_only=False)["module"]
    assert any(k.endswith("q_proj.row_perm") for k in module)
