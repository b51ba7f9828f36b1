"""Spectral Adapter (^A, ^R) and SMoA: lifecycle, fast forward against the dense update, the papers'
formulas, the plan math against numpy oracles, 8B counts on meta, and ZeRO-3 on 2 ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

from megaspec import AdapterConfig, apply_adapters, save_adapter
from megaspec.adapters import dense_weight
from megaspec.model import WEIGHTS_NAME, adapters_of
from megaspec.spectral.lowrank import cayley, spectral_index_scores, spectral_order, split_sizes, top_singular

from .conftest import CASES, batch, tiny_config, train, zero3_config, zero3_tiny_llama
from .distributed import run_ranks
from .test_param_counts import llama31_8b_meta

METHODS = ["spectral_a", "spectral_r", "smoa"]  # their shared lifecycle is in test_adapters.py (METHOD_CASES)
SHAPES = [(64, 64), (32, 64), (128, 64), (64, 128), (7, 5)]


def standalone(method: str, shape: tuple[int, int], dtype: torch.dtype = torch.float64, **overrides):
    """One adapted linear (planned through apply_adapters) with random non-zero trainables."""
    torch.manual_seed(sum(shape))
    holder = nn.Module()
    holder.proj = nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
    config = AdapterConfig(**{"method": method, "lora_rank": 3, "n_blocks": 2, "target_modules": ["proj"], **overrides})
    apply_adapters(holder, config)
    adapter = holder.proj.to(dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter.parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return adapter


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_forward_equals_dense_update(method, shape):
    adapter = standalone(method, shape)
    x = torch.randn(5, 3, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dense = adapter.delta_weight()
    assert dense.dtype == torch.float64 and dense.shape == shape and dense.abs().max() > 1e-3
    torch.testing.assert_close(adapter.delta(x), x @ dense.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(adapter(x), adapter.base(x) + x @ dense.T, atol=1e-10, rtol=0)
    rows = torch.randperm(shape[0], generator=torch.Generator().manual_seed(4))[: max(1, shape[0] // 3)]
    torch.testing.assert_close(adapter.delta_weight(rows), dense[rows], atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_forward(method, tiny_model):
    apply_adapters(tiny_model, CASES[method].config)
    for adapter in adapters_of(tiny_model).values():
        for p in adapter.parameters(recurse=False):
            p.data.normal_()
    out = tiny_model.to(torch.bfloat16)(batch()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_configs(tiny_model):
    with pytest.raises(ValueError, match="lora_rank=40"):
        apply_adapters(tiny_model, AdapterConfig(method="spectral_a", lora_rank=40, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="at least n_blocks"):
        apply_adapters(tiny_model, AdapterConfig(method="smoa", lora_rank=2, n_blocks=3))


# --- plan math against numpy ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_top_singular_against_numpy(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    r = min(3, *shape)
    u1, s1, v1 = top_singular(w, r)
    u, s, vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
    np.testing.assert_allclose(s1.numpy(), s[:r], rtol=1e-6)
    np.testing.assert_allclose(np.abs(u1.numpy()), np.abs(u[:, :r]), atol=1e-6)
    np.testing.assert_allclose((u1 * s1) @ v1.T, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5)
    pivot = u1.abs().argmax(0)
    assert (u1[pivot, torch.arange(r)] > 0).all(), "largest-|.| entry of each left vector is positive"
    again = top_singular(-w, r)  # flipping W flips one side of each pair only
    assert torch.equal(again[0], u1) and torch.equal(again[2], -v1)


def test_cayley_against_numpy():
    x = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = (x - x.T).numpy() / 2
    eye = np.eye(6)
    np.testing.assert_allclose(cayley(x).numpy(), (eye - k) @ np.linalg.inv(eye + k), atol=1e-12)
    np.testing.assert_allclose((cayley(x).T @ cayley(x)).numpy(), eye, atol=1e-12)
    assert torch.equal(cayley(torch.zeros(5, 5)), torch.eye(5))


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (12, 12)])
def test_smoa_scores_against_naive_sums(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    u, s, vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
    v = vh.T

    def naive(vectors: np.ndarray) -> np.ndarray:
        out = []
        for i in range(vectors.shape[0]):
            num = sum(vectors[i, j] ** 2 * s[j] ** 2 * j for j in range(s.size))
            den = sum(vectors[i, j] ** 2 * s[j] ** 2 for j in range(s.size))
            out.append(num / den)
        return np.array(out)

    rows, cols = spectral_index_scores(w)
    np.testing.assert_allclose(rows.numpy(), naive(u), atol=1e-10)
    np.testing.assert_allclose(cols.numpy(), naive(v), atol=1e-10)
    row_order, col_order = spectral_order(w)
    assert row_order.tolist() == np.argsort(naive(u), kind="stable").tolist()
    assert col_order.tolist() == np.argsort(naive(v), kind="stable").tolist()


def test_split_sizes_follow_tensor_split():
    for n in range(1, 12):
        for k in range(1, n + 1):
            assert split_sizes(n, k) == [c.numel() for c in torch.tensor_split(torch.arange(n), k)]


# --- each method's own formula -------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_a_is_the_papers_update(shape):
    """dW = (U1 + B) S1 (V1 + A^T)^T - U1 S1 V1^T, the top-r factors of the plan being W0's."""
    a = standalone("spectral_a", shape)
    u1, s1, v1 = a.U1, torch.diag(a.S1), a.V1
    paper = (u1 + a.spectral_B) @ s1 @ (v1 + a.spectral_A.T).T - u1 @ s1 @ v1.T
    torch.testing.assert_close(a.delta_weight(), paper.detach(), atol=1e-12, rtol=0)
    ref = top_singular(dense_weight(a.base), a.config.lora_rank)
    assert all(torch.equal(buf.float(), r) for buf, r in zip((a.U1, a.S1, a.V1), ref, strict=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_r_is_a_rotation_of_the_top_triplets(shape):
    """W0 + dW = [U1 Q_U, U2] diag(S1 c, S2) [V1 Q_V, V2]^T (full SVD of W0 in float64)."""
    a = standalone("spectral_r", shape)
    w0 = dense_weight(a.base).double()
    r = a.config.lora_rank
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    u1, v1 = a.U1.double(), a.V1.double()
    q_u, q_v = cayley(a.X_U.detach()), cayley(a.X_V.detach())
    sv = torch.cat([a.S1.double() * a.c.detach(), s[r:]])
    rotated = torch.cat([u1 @ q_u, u[:, r:]], 1) @ torch.diag(sv) @ torch.cat([v1 @ q_v, vh[r:].T], 1).T
    # U1, S1, V1 are float32 copies of the float64 SVD: the identity holds to fp32 rounding
    torch.testing.assert_close(w0 + a.delta_weight(), rotated, atol=1e-5, rtol=0)


def test_spectral_r_bases_stay_orthonormal(tiny_model):
    config, lr = CASES["spectral_r"].config, CASES["spectral_r"].lr
    apply_adapters(tiny_model, config)
    train(tiny_model, batch(), lr=lr)
    for adapter in adapters_of(tiny_model).values():
        assert adapter.X_U.detach().abs().max() > 1e-3, "training must have rotated the bases"
        eye = torch.eye(config.lora_rank, dtype=torch.float32)
        for basis in adapter.rotated():
            torch.testing.assert_close(basis.T @ basis, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_blocks", [1, 2, 3])
def test_smoa_update_is_block_diagonal_and_hadamard(shape, n_blocks):
    a = standalone("smoa", shape, n_blocks=n_blocks, lora_rank=4, alpha=6)
    w0 = a.base.weight.detach()  # float64; the plan saw it as fp32 (dense_weight)
    assert torch.equal(a.row_perm, spectral_order(dense_weight(a.base))[0])
    assert torch.equal(a.col_perm, spectral_order(dense_weight(a.base))[1])
    permuted = a.delta_weight()[a.row_perm][:, a.col_perm]
    anchor = w0[a.row_perm][:, a.col_perm]
    expected = torch.zeros_like(permuted)
    rb, cb = a.row_bounds.tolist(), a.col_bounds.tolist()
    ranks = []
    for k in range(n_blocks):
        a_k, b_k = a.factors(k)
        ranks.append(a_k.shape[0])
        block = (slice(rb[k], rb[k + 1]), slice(cb[k], cb[k + 1]))
        expected[block] = (6 / 4) * (b_k @ a_k).detach() * anchor[block]
    assert torch.equal(permuted[expected == 0], torch.zeros_like(permuted[expected == 0]))
    torch.testing.assert_close(permuted, expected, atol=1e-12, rtol=0)
    assert ranks == [c.numel() for c in torch.tensor_split(torch.arange(4), n_blocks)]
    assert a.trainable_count() == sum(r * (rb[k + 1] - rb[k] + cb[k + 1] - cb[k]) for k, r in enumerate(ranks))


def test_smoa_init_and_saved_state(tiny_model, tmp_path):
    config = CASES["smoa"].config
    apply_adapters(tiny_model, config)
    adapter = tiny_model.model.layers[0].mlp.down_proj  # 64 x 128
    for k, cols in enumerate(split_sizes(128, 2)):
        a_k, b_k = adapter.factors(k)
        bound = 1 / cols**0.5  # kaiming_uniform_(a=sqrt 5) on fan_in = |C_k|
        assert a_k.shape == (2, cols) and 0.5 * bound < a_k.abs().max() <= bound
        assert b_k.shape == (32, 2) and not b_k.any()
    assert adapter.scale == config.alpha / config.lora_rank
    save_adapter(tiny_model, tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    prefix = "model.layers.0.mlp.down_proj."
    mine = sorted(k[len(prefix) :] for k in saved if k.startswith(prefix))
    assert mine == ["col_bounds", "col_perm", "lora_A_0", "lora_A_1", "lora_B_0", "lora_B_1", "row_bounds", "row_perm"]


def test_smoa_on_bitsandbytes_base():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    q = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4")
    holder = nn.Module()
    holder.proj = q.to("cpu")
    apply_adapters(holder, AdapterConfig(method="smoa", lora_rank=4, target_modules=["proj"]))
    adapter = holder.proj
    with torch.no_grad():
        adapter.lora_B_0.normal_()
        adapter.lora_B_1.normal_()
        x = torch.randn(3, 64)
        dense = adapter.delta_weight()
        torch.testing.assert_close(adapter(x), adapter.base(x) + x @ dense.T, atol=1e-5, rtol=1e-5)
    w0 = dense_weight(adapter.base)
    assert torch.equal(adapter.row_perm, spectral_order(w0)[0])


# --- LLaMA-3.1-8B counts on meta (docs/methods.md §8) ----------------------------------------------


@pytest.mark.parametrize(
    ("config", "count"),
    [
        (AdapterConfig(method="spectral_a", lora_rank=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "gate_proj"]), 18_874_368),
        (AdapterConfig(method="spectral_r", lora_rank=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "gate_proj"]), 32 * 6 * (2 * 64 + 8)),
        (AdapterConfig(method="smoa", lora_rank=8, n_blocks=2, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]), 7_077_888),
        (AdapterConfig(method="smoa", lora_rank=32, n_blocks=2, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]), 28_311_552),
    ],
    ids=["spectral_a_r8", "spectral_r_r8", "smoa_r8_k2", "smoa_r32_k2"],
)
def test_llama31_8b_counts_on_meta(config, count):
    model = llama31_8b_meta()
    summary = apply_adapters(model, config)
    assert summary.trainable == count and summary.nominal
    assert summary.total == 8_030_261_248 + count  # no frozen copies: SMoA reads anchors from W0
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    q = model.model.layers[0].self_attn.q_proj
    for key, buf in q.plan_state().items():
        assert buf.shape == q.nominal_plan()[key].shape


# --- ZeRO-3 on 2 ranks against 1 process -----------------------------------------------------

ZERO3_STEPS = 3


def _zero3_run(weights_path: str) -> dict:
    """One rank: each method on a partitioned tiny LLaMA, trained on this rank's half of the batch."""
    import deepspeed

    state = torch.load(weights_path)
    rank = torch.distributed.get_rank()
    out = {}
    for method in METHODS:
        config, lr = CASES[method].config, CASES[method].lr
        ds_config = zero3_config(lr)  # every weight released: SMoA takes its anchors inside the base's forward (the hook)
        model = zero3_tiny_llama(ds_config, state)
        apply_adapters(model, config)
        plans = {n: {k: v.clone() for k, v in a.plan_state().items()} for n, a in adapters_of(model).items()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        losses = []
        for _ in range(ZERO3_STEPS):
            ids = batch()[2 * rank : 2 * rank + 2]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        base = model.model.layers[0].self_attn.q_proj.base
        # SMoA's anchor hook must run before DeepSpeed's post-forward release hook
        first_hook = getattr(next(iter(base._forward_hooks.values())), "__name__", "")
        out[method] = {"losses": losses, "plans": plans, "released": base.weight.numel() == 0, "first_hook": first_hook}
    return out


@pytest.mark.slow
def test_zero3_two_ranks_match_one_process(tmp_path):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_config())
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    ranks = [r.value for r in run_ranks(_zero3_run, 2, args=(str(tmp_path / "weights.pt"),), timeout=400)]
    for method in METHODS:
        config, lr = CASES[method].config, CASES[method].lr
        model = LlamaForCausalLM(tiny_config())
        model.load_state_dict(torch.load(tmp_path / "weights.pt"))
        apply_adapters(model, config)
        for out in ranks:
            assert out[method]["released"], "the base weight must be partitioned outside its forward"
            assert method != "smoa" or out[method]["first_hook"] == "_grab_anchors"
            for name, adapter in adapters_of(model).items():
                for key, buf in adapter.plan_state().items():
                    assert torch.equal(out[method]["plans"][name][key], buf), (method, name, key)
        losses = train(model, batch(), steps=ZERO3_STEPS, lr=lr)
        two_ranks = [(a + b) / 2 for a, b in zip(ranks[0][method]["losses"], ranks[1][method]["losses"], strict=True)]
        np.testing.assert_allclose(two_ranks, losses, rtol=0, atol=1e-5, err_msg=method)
