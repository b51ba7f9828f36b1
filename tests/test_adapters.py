"""Adapters on a tiny LLaMA: zero init, training, merge, save/load, spectral support, selection rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from megaspec import (
    AdapterConfig,
    apply_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_parameter_count,
)
from megaspec.adapters import dense_weight
from megaspec.model import adapters_of
from megaspec.spectral import dht2, dht2_energy

from .conftest import CASES, METHOD_CASES, TARGETS, batch, tiny_config, train

LIFECYCLE = [pytest.param(case, path, id=f"{case.id}-{path}") for case in METHOD_CASES for path in case.paths]

@pytest.mark.parametrize("case, path", LIFECYCLE)
def test_adapter_lifecycle(case, path, tiny_model, tmp_path, monkeypatch):
    """Every method case (tests/conftest.py METHOD_CASES): plan, train, save, load, merge. "auto" builds the tiny
    layers' dW (megaspec.spectral.sparse DENSE_CROSSOVER); "fast" forces the FFT path that every real-size layer takes."""
    if path == "fast":
        monkeypatch.setattr("megaspec.spectral.sparse.DENSE_CROSSOVER", 0)
    config = case.config
    ids = batch()
    with torch.no_grad():
        before = tiny_model(ids).logits
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    summary = apply_adapters(tiny_model, config)
    assert len(summary.layers) == 8
    assert summary.trainable == trainable_parameter_count(tiny_model) == sum(r["trainable"] for r in summary.layers)
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, before), "delta must be zero at step 0"

    losses = train(tiny_model, ids, lr=case.lr)
    assert losses[-1] < losses[0] - case.gain, losses
    for name, p in tiny_model.named_parameters():  # frozen weights untouched
        if not p.requires_grad:
            assert torch.equal(p, frozen[name.replace(".base.", ".")])
    with torch.no_grad():
        adapted = tiny_model(ids).logits

    save_adapter(tiny_model, tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(tiny_config()).eval()
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, adapted, atol=0, rtol=0)
        merge_adapters(fresh)
        assert not adapters_of(fresh)
        torch.testing.assert_close(fresh(ids).logits, adapted, atol=1e-5, rtol=0)


def test_spectrum_index_is_built_once_per_plan_and_follows_plan_changes(tiny_model, monkeypatch):
    """The fast path's index tensors are built once per layer, not per step, and rebuilt when the plan buffers change."""
    import megaspec.adapters.sparse_spectrum as sparse_spectrum

    monkeypatch.setattr("megaspec.spectral.sparse.DENSE_CROSSOVER", 0)
    builds = []
    build = sparse_spectrum.spectrum_index
    monkeypatch.setattr(sparse_spectrum, "spectrum_index", lambda *a, **k: builds.append(a[2]) or build(*a, **k))
    apply_adapters(tiny_model, CASES["ssh"].config)
    train(tiny_model, batch(), steps=3)
    assert len(builds) == len(adapters_of(tiny_model)) == 8

    adapter = next(iter(adapters_of(tiny_model).values()))
    x = torch.randn(5, adapter.in_features)
    first = adapter.spectrum_index(torch.float32)
    assert adapter.spectrum_index(torch.float32) is first
    with torch.no_grad():  # a new plan copied into the buffers in place (as set_plan and load_state_dict do)
        adapter.rows.copy_((adapter.rows + 1) % adapter.out_features)
        adapter.cols.copy_(adapter.cols.flip(0))
        got = adapter.delta(x)
    assert adapter.spectrum_index(torch.float32) is not first and len(builds) == 9
    torch.testing.assert_close(got, x @ adapter.delta_weight().T, atol=1e-6, rtol=1e-5)
    x64 = x.double()
    with torch.no_grad():
        got64 = adapter.delta(x64)
    assert adapter.spectrum_index(torch.float64).dtype == torch.float64 and len(builds) == 10
    torch.testing.assert_close(got64, x64 @ adapter.delta_weight().double().T, atol=1e-6, rtol=1e-5)


def test_a_spectrum_index_for_another_layer_is_refused():
    """Passing an index built for another shape, kernel or dtype fails in one line instead of computing garbage."""
    from megaspec.spectral.sparse import sparse_spectrum_linear, spectrum_index

    rows, cols = torch.tensor([1, 5, 9]), torch.tensor([0, 3, 7])
    x, c = torch.randn(4, 16), torch.randn(3)
    for index in (spectrum_index(rows, cols, (12, 16), "dht"), spectrum_index(rows, cols, (10, 16), "fourier"),
                  spectrum_index(rows, cols, (10, 16), "dht", torch.float64)):
        with pytest.raises(ValueError, match="rebuild it with spectrum_index"):
            sparse_spectrum_linear(x, c, rows, cols, 10, "dht", path="fast", index=index)
    ok = sparse_spectrum_linear(x, c, rows, cols, 10, "dht", path="fast", index=spectrum_index(rows, cols, (10, 16), "dht"))
    torch.testing.assert_close(ok, sparse_spectrum_linear(x, c, rows, cols, 10, "dht", path="dense"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("key", ["ssh", "ssh_per_layer"])
def test_learned_update_lives_on_planned_positions(key, tiny_model):
    """DHT2(dW) = scale * S: non-zero exactly at the planned positions, nowhere else."""
    apply_adapters(tiny_model, CASES[key].config)
    train(tiny_model, batch(), steps=3)
    for adapter in adapters_of(tiny_model).values():
        spectrum = dht2(adapter.delta_weight().double())  # fp32 update: noise ~1e-7 of the peak
        support = spectrum.abs() > 1e-4 * spectrum.abs().max()
        planned = torch.zeros_like(support)
        planned[adapter.rows, adapter.cols] = True
        assert support.sum() <= adapter.rows.numel()
        assert torch.equal(support, planned & support) and torch.equal(support, planned)
        torch.testing.assert_close(spectrum[adapter.rows, adapter.cols], adapter.scale * adapter.coeffs.detach().double(), atol=1e-5 * float(spectrum.abs().max()), rtol=1e-4)


def test_ssh_global_selection_oracle(tiny_model):
    """Energy picks are the floor per layer plus the global top scores of the ortho energy (brute force)."""
    weights = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if n.endswith(tuple(TARGETS))}
    config = CASES["ssh"].config
    summary = apply_adapters(tiny_model, config)
    adapters = adapters_of(tiny_model)
    total = config.n_coeffs * len(adapters)
    assert summary.trainable == total
    budget = math.floor(config.energy_ratio * total)
    floor = config.min_per_layer
    expected = {}
    pool = []
    for i, (name, w) in enumerate(weights.items()):
        energy = dht2_energy(w.double()).flatten().float().numpy()
        order = np.lexsort((np.arange(energy.size), -energy.astype(np.float64)))
        expected[name] = set(order[:floor].tolist())
        pool += [(-float(energy[p]), i, int(p), name) for p in order[floor:]]
    for _, _, p, name in sorted(pool)[: budget - floor * len(weights)]:
        expected[name].add(p)
    for name, adapter in adapters.items():
        n_in = adapter.in_features
        flat = (adapter.rows * n_in + adapter.cols)
        assert flat.unique().numel() == flat.numel()
        assert set(flat[adapter.from_energy].tolist()) == expected[name]
    assert sum(int(a.from_energy.sum()) for a in adapters.values()) == budget
    # random part split in proportion to M * N
    sizes = {n: math.prod(a.shape) for n, a in adapters.items()}
    random_total = total - budget
    for name, adapter in adapters.items():
        share = random_total * sizes[name] / sum(sizes.values())
        assert abs(int((~adapter.from_energy).sum()) - share) <= 1


def test_ssh_per_layer_counts_and_determinism(tiny_model):
    config = CASES["ssh_per_layer"].config
    apply_adapters(tiny_model, config)
    first = {n: (a.rows.clone(), a.cols.clone()) for n, a in adapters_of(tiny_model).items()}
    for adapter in adapters_of(tiny_model).values():
        assert adapter.rows.numel() == config.n_coeffs
        assert int(adapter.from_energy.sum()) == math.floor(config.energy_ratio * config.n_coeffs)
        energy = dht2_energy(dense_weight(adapter.base)).flatten()
        top = set(torch.topk(energy, int(adapter.from_energy.sum())).indices.tolist())
        assert set((adapter.rows * adapter.in_features + adapter.cols)[adapter.from_energy].tolist()) == top
    torch.manual_seed(0)
    again = LlamaForCausalLM(tiny_config()).eval()
    apply_adapters(again, config)
    for name, adapter in adapters_of(again).items():
        assert torch.equal(adapter.rows, first[name][0]) and torch.equal(adapter.cols, first[name][1])
    torch.manual_seed(0)
    other = LlamaForCausalLM(tiny_config()).eval()
    apply_adapters(other, AdapterConfig(**{**config.__dict__, "seed": 7}))
    assert any(not torch.equal(a.rows, first[n][0]) for n, a in adapters_of(other).items())


def test_fourierft_positions_follow_peft(tiny_model):
    from peft import FourierFTConfig, get_peft_model

    apply_adapters(tiny_model, AdapterConfig(method="fourierft", n_coeffs=50, seed=777, target_modules=["v_proj"]))
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM(tiny_config()), FourierFTConfig(n_frequency=50, target_modules=["v_proj"]))
    ref = peft_model.base_model.model.model.layers[0].self_attn.v_proj.indices["default"]
    ours = tiny_model.model.layers[0].self_attn.v_proj
    assert sorted((ref[0] * 64 + ref[1]).tolist()) == (ours.rows * 64 + ours.cols).tolist()


def test_bf16_forward(tiny_model):
    apply_adapters(tiny_model, CASES["ssh"].config)
    for a in adapters_of(tiny_model).values():
        a.coeffs.data.normal_()
    model = tiny_model.to(torch.bfloat16)
    ids = batch()
    out = model(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_configs(tiny_model):
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_adapters(tiny_model, AdapterConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="unknown method"):
        apply_adapters(tiny_model, AdapterConfig(method="dora"))
    with pytest.raises(ValueError, match="n_coeffs=5000"):
        apply_adapters(tiny_model, AdapterConfig(n_coeffs=5000))
    with pytest.raises(ValueError, match="n_coeffs=0"):
        apply_adapters(tiny_model, AdapterConfig(method="fourierft", n_coeffs=0))
