"""Transforms and sparse-spectrum operators against naive O(N^2) oracles and the dense path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megaspec.spectral import (
    KERNELS,
    dense_spectrum,
    dense_update,
    dht,
    dht2,
    dht2_energy,
    dht2_energy_topk,
    idht2,
    sparse_spectrum_linear,
    sparse_spectrum_rows,
)

SHAPES = [(5, 5), (6, 8), (7, 4), (9, 12), (16, 10), (1, 6), (6, 1)]


def naive_dht(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    k = np.arange(n)
    arg = 2 * np.pi * np.outer(k, k) / n
    return x @ (np.cos(arg) + np.sin(arg)).T


def naive_dht2(x: np.ndarray, separable: bool = False) -> np.ndarray:
    m, n = x.shape
    a, b = np.arange(m), np.arange(n)
    if separable:
        cm = np.cos(2 * np.pi * np.outer(a, a) / m) + np.sin(2 * np.pi * np.outer(a, a) / m)
        cn = np.cos(2 * np.pi * np.outer(b, b) / n) + np.sin(2 * np.pi * np.outer(b, b) / n)
        return cm @ x @ cn
    out = np.zeros((m, n))
    for k in range(m):
        for l in range(n):  # noqa: E741
            t = 2 * np.pi * (k * a[:, None] / m + l * b[None, :] / n)
            out[k, l] = np.sum(x * (np.cos(t) + np.sin(t)))
    return out


def naive_update(coeffs, rows, cols, shape, kernel):
    """dW[a, b] = sum_j c_j K(a, b; u_j, v_j) / (M N), summed term by term."""
    m, n = shape
    a, b = np.arange(m)[:, None], np.arange(n)[None, :]
    out = np.zeros(shape)
    for c, u, v in zip(coeffs, rows, cols, strict=True):
        th, ph = 2 * np.pi * a * u / m, 2 * np.pi * b * v / n
        if kernel == "dht":
            out += c * (np.cos(th + ph) + np.sin(th + ph))
        elif kernel == "dht_separable":
            out += c * (np.cos(th) + np.sin(th)) * (np.cos(ph) + np.sin(ph))
        else:
            out += c * np.cos(th + ph)
    return out / (m * n)


def random_positions(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(shape[0] * shape[1], generator=g)[:n]
    return flat // shape[1], flat % shape[1]


@pytest.mark.parametrize("n", [1, 2, 7, 8, 15, 64])
def test_dht_matches_naive_cas_sum(n):
    x = torch.randn(3, n, dtype=torch.float64)
    np.testing.assert_allclose(dht(x).numpy(), naive_dht(x.numpy()), atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("separable", [False, True])
def test_dht2_matches_naive_and_inverts(shape, separable):
    x = torch.randn(*shape, dtype=torch.float64)
    np.testing.assert_allclose(dht2(x, separable).numpy(), naive_dht2(x.numpy(), separable), atol=1e-10, rtol=0)
    torch.testing.assert_close(idht2(dht2(x, separable), separable), x, atol=1e-12, rtol=0)


def test_dht2_variants_relation_and_parseval():
    """docs/methods.md §1.1: H = (Hs[k,l] + Hs[-k,l] + Hs[k,-l] - Hs[-k,-l]) / 2; energies sum to ||W||^2."""
    x = torch.randn(6, 9, dtype=torch.float64)
    h, hs = dht2(x), dht2(x, separable=True)
    flip_k, flip_l = torch.roll(torch.flip(hs, [0]), 1, 0), torch.roll(torch.flip(hs, [1]), 1, 1)
    flip_kl = torch.roll(torch.flip(flip_k, [1]), 1, 1)
    torch.testing.assert_close(h, (hs + flip_k + flip_l - flip_kl) / 2, atol=1e-10, rtol=0)
    torch.testing.assert_close(dht2_energy(x).sum(), x.square().sum(), atol=1e-10, rtol=0)


def test_half_precision_runs_in_fp32():
    x = torch.randn(4, 8, 12)
    for dtype in (torch.bfloat16, torch.float16):
        out = dht2(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), dht2(x.to(dtype).float()).to(dtype).float())


@pytest.mark.parametrize("shape", SHAPES + [(32, 20), (20, 33)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_dense_update_matches_naive(shape, kernel):
    n = min(9, shape[0] * shape[1])
    rows, cols = random_positions(shape, n)
    c = torch.randn(n, dtype=torch.float64)
    expected = naive_update(c.numpy(), rows.numpy(), cols.numpy(), shape, kernel)
    np.testing.assert_allclose(dense_update(c, rows, cols, shape, kernel).numpy(), expected, atol=1e-12, rtol=0)
    rows_only = sparse_spectrum_rows(c, rows, cols, shape, kernel=kernel, block=4)
    np.testing.assert_allclose(rows_only.numpy(), expected, atol=1e-12, rtol=0)
    some = torch.tensor([shape[0] - 1, 0])
    np.testing.assert_allclose(sparse_spectrum_rows(c, rows, cols, shape, some, kernel).numpy(), expected[[shape[0] - 1, 0]], atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES + [(32, 20), (20, 33), (64, 64)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_forward_matches_dense_float64(shape, kernel):
    n = min(11, shape[0] * shape[1])
    rows, cols = random_positions(shape, n, seed=1)
    c = torch.randn(n, dtype=torch.float64)
    x = torch.randn(2, 3, shape[1], dtype=torch.float64)
    dw = dense_update(c, rows, cols, shape, kernel)
    torch.testing.assert_close(sparse_spectrum_linear(x, c, rows, cols, shape[0], kernel, path="fast"), x @ dw.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_forward_float32_relative(kernel):
    shape = (96, 160)
    rows, cols = random_positions(shape, 300, seed=2)
    c = torch.randn(300)
    x = torch.randn(64, shape[1])
    y = sparse_spectrum_linear(x, c, rows, cols, shape[0], kernel, path="fast")
    ref = (x.double() @ dense_update(c.double(), rows, cols, shape, kernel).T).float()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-4


def test_repeated_rows_and_columns_accumulate():
    """Several coefficients on one row / one column (and duplicate positions) add up."""
    shape = (8, 6)
    rows, cols = torch.tensor([0, 0, 4, 4, 7, 3, 3]), torch.tensor([0, 3, 3, 5, 1, 2, 2])
    c = torch.randn(7, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    for kernel in KERNELS:
        dw = torch.from_numpy(naive_update(c.numpy(), rows.numpy(), cols.numpy(), shape, kernel))
        torch.testing.assert_close(sparse_spectrum_linear(x, c, rows, cols, 8, kernel, path="fast"), x @ dw.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_forward_gradcheck(kernel):
    shape = (6, 10)
    rows, cols = random_positions(shape, 7, seed=3)
    c = torch.randn(7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx, cc: sparse_spectrum_linear(xx, cc, rows, cols, 6, kernel, path="fast"), (x, c))


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_match_dense_path(kernel):
    shape = (12, 20)
    rows, cols = random_positions(shape, 15, seed=4)
    x = torch.randn(7, 20, dtype=torch.float64)
    g = torch.randn(7, 12, dtype=torch.float64)
    c1 = torch.randn(15, dtype=torch.float64, requires_grad=True)
    c2 = c1.detach().clone().requires_grad_(True)
    (sparse_spectrum_linear(x, c1, rows, cols, 12, kernel, path="fast") * g).sum().backward()
    (x @ dense_update(c2, rows, cols, shape, kernel).T * g).sum().backward()
    torch.testing.assert_close(c1.grad, c2.grad, atol=1e-12, rtol=0)
    if kernel == "dht":  # docs/methods.md §1.3 closed form: dL/dc = DHT2(g^T x)[u, v] / (M N)
        torch.testing.assert_close(c1.grad, dht2(g.T @ x)[rows, cols] / math.prod(shape), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_many_tokens_in_several_passes_match_dense_path(kernel, monkeypatch):
    """More tokens than one CPU pass (CPU_PASS_ELEMENTS // (M + N + 2n) rows), the last pass partial, in a (batch, seq, N) input."""
    from megaspec.spectral import sparse

    shape = (24, 40)
    width = sum(shape) + 2 * 30
    monkeypatch.setattr(sparse, "CPU_PASS_ELEMENTS", 100 * width)  # 100 rows per pass
    assert sparse._row_passes(237, width, torch.device("cpu"))[-1] == slice(200, 300)
    rows, cols = random_positions(shape, 30, seed=5)
    tokens = 237
    x1 = torch.randn(1, tokens, 40, dtype=torch.float64)
    x1.requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(1, tokens, 24, dtype=torch.float64)
    c1 = torch.randn(30, dtype=torch.float64, requires_grad=True)
    c2 = c1.detach().clone().requires_grad_(True)
    y = sparse_spectrum_linear(x1, c1, rows, cols, 24, kernel, path="fast")
    expected = x2 @ dense_update(c2, rows, cols, shape, kernel).T
    assert y.shape == expected.shape == (1, tokens, 24)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(c1.grad, c2.grad, atol=1e-10, rtol=0)


def test_cpu_passes_shrink_with_the_layer_and_gpus_take_one_pass():
    """Rows per CPU pass keep rows x (M + N + 2n) within CPU_PASS_ELEMENTS, between MIN_ and MAX_ROWS_PER_PASS; one pass on a GPU."""
    from megaspec.spectral.sparse import CPU_PASS_ELEMENTS, MAX_ROWS_PER_PASS, MIN_ROWS_PER_PASS, _row_passes

    cpu = torch.device("cpu")
    for m, n_in, n, per_pass in [(4096, 4096, 750, 108), (4096, 14336, 750, 52), (8192, 28672, 750, 27),
                                 (1024, 1024, 1000, 256), (10**6, 10**6, 750, MIN_ROWS_PER_PASS)]:
        width = m + n_in + 2 * n
        passes = _row_passes(2048, width, cpu)
        assert [p.stop - p.start for p in passes[:-1]] == [per_pass] * (len(passes) - 1)
        assert passes[-1].start < 2048 <= passes[-1].stop
        assert MIN_ROWS_PER_PASS <= per_pass <= MAX_ROWS_PER_PASS
        assert per_pass * width <= CPU_PASS_ELEMENTS or per_pass == MIN_ROWS_PER_PASS
    assert _row_passes(2048, 4096 + 4096, torch.device("cuda")) == [slice(0, 2048)]


@pytest.mark.parametrize("kernel", KERNELS)
def test_auto_path_is_dense_only_for_tiny_layers_and_agrees(kernel):
    """path="auto" builds dW only where M N <= DENSE_CROSSOVER (n + M + N); both paths give the same y and gradients."""
    from megaspec.spectral.sparse import DENSE_CROSSOVER, fast_path_pays

    assert not fast_path_pays((64, 64), 8) and not fast_path_pays((128, 128), 100)
    assert fast_path_pays((512, 512), 1000) and fast_path_pays((1024, 2048), 750) and fast_path_pays((4096, 4096), 100_000)
    assert fast_path_pays((256, 256), 100) and not fast_path_pays((256, 256), 1000)
    assert fast_path_pays((64, 64), 0) == (64 * 64 > DENSE_CROSSOVER * 128)
    for shape, n in (((16, 24), 10), ((300, 260), 12)):
        assert fast_path_pays(shape, n) == (shape == (300, 260))
        rows, cols = random_positions(shape, n, seed=6)
        x = torch.randn(5, shape[1], dtype=torch.float64)
        grads = {}
        for path in ("auto", "fast", "dense"):
            c = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            y = sparse_spectrum_linear(x, c, rows, cols, shape[0], kernel, path=path)
            y.square().sum().backward()
            grads[path] = (y.detach(), c.grad)
        for path in ("auto", "dense"):
            torch.testing.assert_close(grads[path][0], grads["fast"][0], atol=1e-10, rtol=0)
            torch.testing.assert_close(grads[path][1], grads["fast"][1], atol=1e-8, rtol=1e-10)
    with pytest.raises(ValueError, match="unknown path"):
        sparse_spectrum_linear(x, c, rows, cols, 300, kernel, path="sparse")


def test_fourier_update_matches_peft():
    """FourierFT dW equals HF peft's get_delta_weight for the same positions and coefficients."""
    from peft import FourierFTConfig, get_peft_model
    from torch import nn

    model = nn.Sequential(nn.Linear(24, 40, bias=False))
    peft_model = get_peft_model(model, FourierFTConfig(n_frequency=50, scaling=150.0, target_modules=["0"], random_loc_seed=777))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.fourierft_spectrum["default"].copy_(torch.randn(50))
    expected = layer.get_delta_weight("default")
    idx = layer.indices["default"]
    coeffs = layer.fourierft_spectrum["default"].detach() * 150.0
    ours = dense_update(coeffs, idx[0], idx[1], (40, 24), "fourier")
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    x = torch.randn(5, 24)
    torch.testing.assert_close(sparse_spectrum_linear(x, coeffs, idx[0], idx[1], 40, "fourier", path="fast"), x @ expected.T, atol=1e-5, rtol=1e-4)


def test_dense_spectrum_scatter():
    s = dense_spectrum(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 2]), torch.tensor([1, 0, 0]), (3, 2))
    assert s.tolist() == [[0.0, 1.0], [0.0, 0.0], [5.0, 0.0]]


@pytest.mark.parametrize("shape", SHAPES + [(32, 20), (20, 33), (64, 128)])
@pytest.mark.parametrize("separable", [False, True])
def test_energy_topk_matches_full_energy(shape, separable):
    """The lean rfft2 top-k equals sorting the full ortho energy map: every position once, scores exact."""
    w = torch.randn(*shape, dtype=torch.float64)
    energy = dht2_energy(w, separable).flatten()
    scores, positions = dht2_energy_topk(w, energy.numel(), separable)
    assert sorted(positions.tolist()) == list(range(energy.numel()))
    torch.testing.assert_close(scores, energy[positions], atol=1e-12, rtol=0)
    torch.testing.assert_close(scores, torch.sort(energy, descending=True).values, atol=1e-12, rtol=0)
    top3 = dht2_energy_topk(w, 3, separable)[1]
    assert top3.tolist() == positions[:3].tolist()


def test_no_tokens_give_empty_outputs_and_zero_coefficient_gradients():
    """A batch with no tokens (an empty micro-batch shard) runs through the fast path: empty y and dL/dx, zero dL/dc."""
    rows, cols = random_positions((32, 64), 3, seed=1)
    x = torch.randn(2, 0, 64, requires_grad=True)
    c = torch.randn(3, requires_grad=True)
    y = sparse_spectrum_linear(x, c, rows, cols, 32, path="fast")
    assert y.shape == (2, 0, 32)
    y.sum().backward()
    assert x.grad.shape == (2, 0, 64) and torch.equal(c.grad, torch.zeros(3))
