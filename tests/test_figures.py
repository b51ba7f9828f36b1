"""Figures read back against oracles: allocation bars vs the plan, centred spectra vs fftshift, heatmap pixels vs norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from transformers import LlamaForCausalLM

import megaspec
from megaspec.model import adapters_of
from megaspec.spectral.transforms import dht2
from megaspec.train import figures
from megaspec.train.monitor import layer_tags

from .conftest import tiny_config


def ssh_model(layers: int = 4, n_coeffs: int = 40) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=layers))
    megaspec.apply_adapters(model, megaspec.AdapterConfig(method="ssh", n_coeffs=n_coeffs, target_modules=["q_proj", "v_proj"]))
    return model


def pixel(rgb: np.ndarray, fig, ax, x: float, y: float) -> np.ndarray:
    """The RGB at data point (x, y) of `ax` in the rendered figure (display origin is bottom-left)."""
    px, py = ax.transData.transform((x, y))
    return rgb[int(round(fig.bbox.height - py)), int(round(px))].astype(int)


def invert_viridis(colour: np.ndarray) -> float:
    """The [0, 1] value whose viridis colour is nearest to `colour`."""
    table = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round()
    return float(np.argmin(((table - colour) ** 2).sum(axis=1))) / 255


@pytest.mark.parametrize("size", [1, 4, 5, 64, 99])
def test_signed_frequency_is_numpy_fftshift(size: int) -> None:
    index = np.arange(size)
    signed = figures.signed_frequency(index, size)
    # fftshift puts index u at position (u + size//2) % size; the centred axis runs from -(size//2)
    assert np.array_equal(np.fft.fftshift(index)[signed + size // 2], index)
    assert np.array_equal(signed, np.round(np.fft.fftfreq(size) * size).astype(int))


def test_energy_background_centres_a_pure_frequency() -> None:
    m, n, u0, v0 = 48, 64, 3, 5
    r, c = torch.meshgrid(torch.arange(m), torch.arange(n), indexing="ij")
    weight = torch.cos(2 * torch.pi * (u0 * r / m + v0 * c / n)).double()
    for kernel in ("dht", "fourier"):
        energy = figures.weight_energy(weight, kernel)
        background = figures.energy_background(energy)
        assert background.shape == (m, n)
        hot = {tuple(int(i) for i in ix) for ix in np.argwhere(background > background.max() - 1e-3)}
        # (u0, v0) and its mirror (-u0, -v0), at row u + m//2, column v + n//2 of the centred map
        assert hot == {(u0 + m // 2, v0 + n // 2), (-u0 + m // 2, -v0 + n // 2)}
    dense = (dht2(weight) ** 2 / (m * n)).float()
    assert float(figures.weight_energy(weight, "dht").sum()) == pytest.approx(float((weight**2).sum()), rel=1e-5)  # Parseval
    big = torch.rand(512, 384, generator=torch.Generator().manual_seed(0)) + 1e-3
    pooled = figures.energy_background(big, max_side=128)
    oracle = F.avg_pool2d(torch.roll(big, (256, 192), (0, 1))[None], (4, 3))[0].double().log10().numpy()
    assert pooled.shape == (128, 128) and np.allclose(pooled, oracle, atol=1e-6)
    assert dense.shape == (m, n)


def test_allocation_bars_equal_the_plan_and_sum_to_the_budget() -> None:
    model = ssh_model(layers=4, n_coeffs=40)
    adapters = adapters_of(model)
    counts = [figures.allocation_counts(a.plan_state(), a.trainable_count()) for a in adapters.values()]
    tags = list(layer_tags(list(adapters)).values())
    fig = figures.allocation_figure(tags, [c[0] for c in counts], [c[1] for c in counts])
    ax = fig.axes[0]
    energy_bars, random_bars = ax.containers
    for name, e_bar, r_bar in zip(adapters, energy_bars, random_bars, strict=True):
        flags = adapters[name].from_energy
        assert e_bar.get_height() == int(flags.sum()) and r_bar.get_height() == int((~flags).sum())
        assert r_bar.get_y() == e_bar.get_height()  # stacked
        assert e_bar.get_height() + r_bar.get_height() == adapters[name].coeffs.numel()
    heights = [b.get_height() for b in energy_bars] + [b.get_height() for b in random_bars]
    assert sum(heights) == 40 * 8  # the global budget: n_coeffs x adapted layers
    assert len({b.get_height() + r.get_height() for b, r in zip(energy_bars, random_bars, strict=True)}) > 1  # uneven split
    mean_line = ax.lines[0]
    assert mean_line.get_ydata()[0] == pytest.approx(40.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == tags
    rgb = figures.figure_rgb(fig)
    assert rgb.shape == (420, 640, 3)
    # the first bar's lower part is the energy colour, its upper part the random colour
    first_e, first_r = energy_bars[0], random_bars[0]
    red = np.array([int(figures.ENERGY_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    blue = np.array([int(figures.RANDOM_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    assert np.abs(pixel(rgb, fig, ax, 0, first_e.get_height() / 2) - red).max() <= 2
    assert np.abs(pixel(rgb, fig, ax, 0, first_e.get_height() + first_r.get_height() / 2) - blue).max() <= 2


def test_spectrum_figure_puts_each_pick_at_its_centred_frequency() -> None:
    model = ssh_model(layers=2, n_coeffs=40)
    adapter = adapters_of(model)["model.layers.0.self_attn.q_proj"]
    m, n = adapter.shape
    coeffs = torch.linspace(-1, 1, adapter.coeffs.numel())
    background = figures.energy_background(figures.weight_energy(adapter.base.weight.detach(), "dht"))
    fig = figures.spectrum_figure("t", (m, n), adapter.rows, adapter.cols, coeffs, adapter.from_energy, background)
    ax = fig.axes[0]
    energy_dots, random_dots = ax.collections
    flags = adapter.from_energy.numpy()
    for dots, pick in ((energy_dots, flags), (random_dots, ~flags)):
        expected = np.stack([figures.signed_frequency(adapter.cols[pick], n), figures.signed_frequency(adapter.rows[pick], m)], 1)
        assert np.array_equal(dots.get_offsets(), expected)
        mag = coeffs.abs().numpy()
        assert np.allclose(dots.get_sizes(), (8 + 52 * mag / mag.max())[pick])  # area grows with |c|, 60 at the top
    assert max(energy_dots.get_sizes().max(), random_dots.get_sizes().max()) == pytest.approx(60.0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == f"energy pick ({int(flags.sum())})" and labels[1] == f"random pick ({int((~flags).sum())})"
    # the background is centred: DC (0, 0) sits in the middle of the axes
    assert ax.get_xlim() == (-(n // 2) - 0.5, n - n // 2 - 0.5) and ax.get_ylim() == (-(m // 2) - 0.5, m - m // 2 - 0.5)
    assert ax.images[0].get_array().shape == (m, n)
    rgb = figures.figure_rgb(fig)
    assert rgb.shape == (540, 640, 3)
    biggest = int(np.argmax(np.where(flags, coeffs.abs().numpy(), -1)))
    red = np.array([int(figures.ENERGY_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    at = pixel(rgb, fig, ax, figures.signed_frequency(adapter.cols[biggest : biggest + 1], n)[0],
               figures.signed_frequency(adapter.rows[biggest : biggest + 1], m)[0])
    assert np.abs(at - red).max() < 60  # the marker (alpha 0.85 over grey) is red there


def test_growth_heatmap_pixels_read_back_as_the_norms() -> None:
    g = torch.Generator().manual_seed(0)
    tags = [f"layers.{i}.q_proj" for i in range(6)]
    steps = [1, 2, 3, 5, 8]
    norms = torch.rand(6, 5, generator=g).cumsum(1).numpy()
    fig = figures.growth_figure(tags, steps, norms)
    rgb = figures.figure_rgb(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == tags
    top = float(norms.max())
    for row in range(6):
        for col, step in enumerate(steps):
            value = invert_viridis(pixel(rgb, fig, ax, step, row)) * top
            assert value == pytest.approx(norms[row, col], abs=top / 255 * 1.5)
    many = figures.growth_figure(tags, list(range(1, 1001)), np.tile(np.arange(1000.0), (6, 1)), max_columns=100)
    assert many.axes[0].collections[0].get_array().shape == (6, 100)


def test_spectrum_layers_spread_over_depth() -> None:
    names = [f"l{i}" for i in range(60)]
    assert figures.spectrum_layers(names, 6) == ["l0", "l12", "l24", "l35", "l47", "l59"]
    assert figures.spectrum_layers(names[:4], 6) == names[:4]


def test_marker_area_shrinks_for_thousands_of_picks() -> None:
    assert figures.marker_area(100) == figures.marker_area(400) == 60.0
    assert figures.marker_area(1600) == pytest.approx(30.0) and figures.marker_area(10**6) == 6.0


def test_curves_figure_plots_the_records() -> None:
    records = [{"step": s, "loss": 5.0 - s, "lr": 0.01 * s, "tokens_per_s": 100.0 + s, "memory": 2**30 * s} for s in (1, 2, 3)]
    records[-1]["eval_loss"] = 1.5
    fig = figures.curves_figure(records)
    loss_ax, lr_ax, tps_ax, mem_ax = fig.axes
    assert list(loss_ax.lines[0].get_ydata()) == [4.0, 3.0, 2.0] and list(loss_ax.lines[1].get_ydata()) == [1.5]
    assert list(lr_ax.lines[0].get_ydata()) == pytest.approx([0.01, 0.02, 0.03])
    assert list(mem_ax.lines[0].get_ydata()) == [1.0, 2.0, 3.0]  # GiB
    assert figures.figure_rgb(fig).shape == (700, 1100, 3)
