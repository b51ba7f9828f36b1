"""Figures of a run, drawn with matplotlib (Agg, no pyplot state): budget allocation, spectra, growth, curves.

Every function takes plain arrays and returns a `matplotlib.figure.Figure`; `figure_rgb` and
`figure_png` turn one into pixels or a PNG. Nothing here communicates or reads files,
so the monitor (during a run) and the report (after it) draw the same pictures from the same numbers.

Conventions, as in a paper's figure:
- Spectra are centred: index u of an M-point DFT/DHT axis is the signed frequency u for
  u < M - M//2 and u - M above (numpy's fftshift), so the low frequencies sit in the middle.
- The frozen weight's spectral energy (the quantity SSH ranks) is drawn as a grey log-scale
  background, mean-pooled to at most BACKGROUND_SIDE cells per side.
- Energy picks are red, random picks blue; marker area grows with |c|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

BACKGROUND_SIDE = 128  # cells per side of the pooled W0 energy map (more only adds PNG bytes)
ENERGY_COLOUR = "#c0392b"  # energy picks (and their bars)
RANDOM_COLOUR = "#2e86c1"  # random picks
ALL_COLOUR = "#5d6d7e"  # positions whose origin is not recorded (FourierFT, S2FT) and low-rank counts
DPI = 100
SPECTRUM_COLOURS = 256  # palette of the spectrum PNGs (figure_png)


# --- rendering ----------------------------------------------------------------------------------
def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A Figure on its own Agg canvas (no pyplot: nothing global, nothing to close).

    layout None: the caller places the axes (constrained layout is 60% of a draw; the per-step
    spectrum images use fixed axes).
    """
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def figure_png(fig: Figure | np.ndarray, colours: int | None = None) -> bytes:
    """The figure (or its figure_rgb array, so that it is drawn once) as PNG bytes.

    colours: a palette PNG of at most that many colours (no dithering); for the spectrum images,
    where marker edges and the grey background make RGB PNGs 2.5 times larger.
    """
    import io

    from PIL import Image

    image = Image.fromarray(fig if isinstance(fig, np.ndarray) else figure_rgb(fig))
    if colours is not None:
        image = image.quantize(colours, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, format="png")
    return buf.getvalue()


def _tick_every(count: int, most: int = 40) -> int:
    return max(1, math.ceil(count / most))


# --- budget allocation --------------------------------------------------------------------------
def allocation_figure(
    tags: Sequence[str], energy: Sequence[int], random: Sequence[int], origin_known: bool = True, unit: str = "coefficients"
) -> Figure:
    """Trainable count per adapted layer in layer order, stacked energy (bottom) vs random picks, with the mean.

    origin_known False (FourierFT, S2FT, low rank): `energy` is ignored and one grey bar per layer
    shows `random` as the whole count.
    """
    energy_arr = np.asarray(energy if origin_known else [0] * len(tags), dtype=np.int64)
    random_arr = np.asarray(random, dtype=np.int64)
    total = energy_arr + random_arr
    count = len(tags)
    x = np.arange(count)
    fig = new_figure(min(16.0, max(6.4, 0.1 * count + 2.0)), 4.2)
    ax = fig.add_subplot()
    if origin_known:
        ax.bar(x, energy_arr, width=0.8, color=ENERGY_COLOUR, label=f"energy picks ({int(energy_arr.sum()):,})")
        ax.bar(x, random_arr, width=0.8, bottom=energy_arr, color=RANDOM_COLOUR, label=f"random picks ({int(random_arr.sum()):,})")
    else:
        ax.bar(x, random_arr, width=0.8, color=ALL_COLOUR, label=f"{unit} ({int(random_arr.sum()):,})")
    mean = float(total.mean()) if count else 0.0
    ax.axhline(mean, color="black", linestyle="--", linewidth=1.0, label=f"mean per layer ({mean:,.0f})")
    step = _tick_every(count, 64)
    ax.set_xticks(x[::step], [tags[i] for i in range(0, count, step)], rotation=90, fontsize=7 if count <= 64 else 6)
    ax.set_xlim(-0.6, count - 0.4)
    ax.set_xlabel("adapted layer (model order)")
    ax.set_ylabel(f"{unit} per layer")
    ax.set_title(f"Budget allocation: {int(total.sum()):,} {unit} over {count} layers")
    ax.set_ylim(0, 1.25 * max(int(total.max()) if count else 1, 1))
    ax.legend(loc="upper center", ncol=3, fontsize=8, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def allocation_counts(tensors: dict[str, torch.Tensor], trainable: int) -> tuple[int, int, bool]:
    """(energy picks, other picks, whether the origin is recorded) of one layer's plan and parameters.

    Sparse spectra count their positions (rows); SSH's from_energy flags split them; other
    methods give their trainable count as one part.
    """
    if "from_energy" in tensors:
        flags = tensors["from_energy"].bool()
        return int(flags.sum()), int((~flags).sum()), True
    if "rows" in tensors:
        return 0, int(tensors["rows"].numel()), False
    return 0, int(trainable), False


# --- spectra ------------------------------------------------------------------------------------
def signed_frequency(index: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """The signed frequency of DFT/DHT indices on an axis of `size` points (what fftshift centres)."""
    index = np.asarray(index, dtype=np.int64)
    return np.where(index < size - size // 2, index, index - size)


def weight_energy(weight: torch.Tensor, kernel: str) -> torch.Tensor:
    """Ortho-normalised spectral energy of W0 in the method's own transform (M x N, fp32, uncentred).

    kernel 'dht' / 'dht_separable': SSH's DHT energy H^2/(M N); 'fourier': |FFT2(W)|^2/(M N).
    """
    from megaspec.spectral.transforms import dht2_energy

    weight = weight.float()
    if kernel in ("dht", "dht_separable"):
        return dht2_energy(weight, separable=kernel == "dht_separable").float()
    m, n = weight.shape
    return (torch.fft.fft2(weight).abs().square() / (m * n)).float()


def energy_background(energy: torch.Tensor, max_side: int = BACKGROUND_SIDE) -> np.ndarray:
    """log10 of the centred energy map, mean-pooled to at most max_side cells per side (row 0: lowest frequency)."""
    m, n = energy.shape
    centred = torch.roll(energy.float(), shifts=(m // 2, n // 2), dims=(0, 1))
    h, w = min(m, max_side), min(n, max_side)
    pooled = torch.nn.functional.adaptive_avg_pool2d(centred[None, None], (h, w))[0, 0].double()
    floor = float(pooled[pooled > 0].min()) if bool((pooled > 0).any()) else 1e-30
    return torch.log10(pooled.clamp_min(floor)).cpu().numpy()  # pooled where the weight is: only h x w cells move


def marker_area(count: int) -> float:
    """Largest marker area (points^2) for `count` picks: 60 up to 400 picks, then shrinking so thousands stay apart."""
    return 60.0 if count <= 400 else max(6.0, 60.0 * math.sqrt(400.0 / count))


def spectrum_figure(
    title: str,
    shape: tuple[int, int],
    rows: np.ndarray | torch.Tensor,
    cols: np.ndarray | torch.Tensor,
    coeffs: np.ndarray | torch.Tensor,
    from_energy: np.ndarray | torch.Tensor | None = None,
    background: np.ndarray | None = None,
) -> Figure:
    """One layer's picks on its centred spectrum: x the column (input) frequency, y the row (output) frequency.

    background: energy_background of W0 (log10, centred), drawn in grey with a colorbar.
    """
    m, n = shape
    y = signed_frequency(rows, m)
    x = signed_frequency(cols, n)
    mag = np.abs(np.asarray(coeffs, dtype=np.float64))
    top = float(mag.max()) if mag.size else 0.0
    largest = marker_area(mag.size)
    sizes = largest * (2.0 + 13.0 * (mag / top if top > 0 else np.zeros_like(mag))) / 15.0
    extent = (-(n // 2) - 0.5, n - n // 2 - 0.5, -(m // 2) - 0.5, m - m // 2 - 0.5)
    fig = new_figure(6.4, 5.4, layout=None)
    ax = fig.add_axes((0.11, 0.09, 0.66, 0.84))
    if background is not None:
        # light greys only (the markers stay visible on the brightest cells); range from the 1st percentile up
        greys = ListedColormap(colormaps["Greys"](np.linspace(0.0, 0.75, 256)))
        low, high = np.percentile(background, [1.0, 100.0])
        image = ax.imshow(background, cmap=greys, origin="lower", extent=extent, aspect="auto", interpolation="nearest",
                          vmin=low, vmax=max(high, low + 1e-6))
        fig.colorbar(image, cax=fig.add_axes((0.8, 0.09, 0.03, 0.84)), label=r"$\log_{10}$ spectral energy of $W_0$")
    else:
        ax.set_facecolor("#f4f6f7")
    handles = []
    if from_energy is not None:
        flags = np.asarray(from_energy, dtype=bool)
        for pick, colour, label in ((flags, ENERGY_COLOUR, "energy pick"), (~flags, RANDOM_COLOUR, "random pick")):
            ax.scatter(x[pick], y[pick], s=sizes[pick], c=colour, alpha=0.85, linewidths=0.3, edgecolors="white")
            handles.append(Line2D([], [], marker="o", linestyle="", color=colour, label=f"{label} ({int(pick.sum()):,})"))
    else:
        ax.scatter(x, y, s=sizes, c=ALL_COLOUR, alpha=0.85, linewidths=0.3, edgecolors="white")
        handles.append(Line2D([], [], marker="o", linestyle="", color=ALL_COLOUR, label=f"position ({x.size:,})"))
    handles.append(Line2D([], [], marker="o", linestyle="", color="black", markersize=math.sqrt(2 * largest / 15), label="c = 0"))
    handles.append(Line2D([], [], marker="o", linestyle="", color="black", markersize=math.sqrt(largest),
                          label=f"max |c| = {top:.3g}" if top > 0 else "all c = 0"))
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.axhline(0, color="black", linewidth=0.4, alpha=0.4)
    ax.axvline(0, color="black", linewidth=0.4, alpha=0.4)
    ax.set_xlabel(f"input (column) frequency, of {n}")
    ax.set_ylabel(f"output (row) frequency, of {m}")
    ax.set_title(title, fontsize=10)
    return fig


def low_rank_figure(title: str, shape: tuple[int, int], mag: np.ndarray | torch.Tensor) -> Figure:
    """|B A| of a low-rank update, max-pooled (megaspec.train.monitor.low_rank_map), with a colorbar."""
    m, n = shape
    fig = new_figure(6.4, 5.0)
    ax = fig.add_subplot()
    image = ax.imshow(np.asarray(mag), cmap="magma", origin="upper", extent=(0, n, m, 0), aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85, label=r"$|\Delta W|$ (max-pooled)")
    ax.set_xlabel("input feature")
    ax.set_ylabel("output feature")
    ax.set_title(title, fontsize=10)
    return fig


def spectrum_layers(names: Sequence[str], most: int) -> list[str]:
    """At most `most` of the layers, evenly spread over the model's depth (first and last included)."""
    if len(names) <= most:
        return list(names)
    picks = np.unique(np.linspace(0, len(names) - 1, most).round().astype(int))
    return [names[i] for i in picks]


# --- growth -------------------------------------------------------------------------------------
def growth_figure(tags: Sequence[str], steps: Sequence[int], norms: np.ndarray, max_columns: int = 400) -> Figure:
    """Layers x steps heatmap of each layer's coefficient norm (rows in model order, top = first layer).

    More than max_columns logged steps are thinned evenly (the last step always kept).
    """
    norms = np.asarray(norms, dtype=np.float64)
    steps_arr = np.asarray(steps, dtype=np.int64)
    if steps_arr.size > max_columns:
        keep = np.unique(np.append(np.linspace(0, steps_arr.size - 1, max_columns).round().astype(int), steps_arr.size - 1))
        steps_arr, norms = steps_arr[keep], norms[:, keep]
    count = len(tags)
    fig = new_figure(8.0, min(12.0, max(3.6, 0.09 * count + 2.0)))
    ax = fig.add_subplot()
    finite = norms[np.isfinite(norms)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    mesh = ax.pcolormesh(steps_arr, np.arange(count), norms, shading="nearest", cmap="viridis",
                         norm=Normalize(vmin=0.0, vmax=vmax))
    ax.set_ylim(count - 0.5, -0.5)
    step = _tick_every(count, 64)
    ax.set_yticks(np.arange(0, count, step), [tags[i] for i in range(0, count, step)], fontsize=7 if count > 12 else 8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("adapted layer")
    fig.colorbar(mesh, ax=ax, label=r"$\|c\|_2$ of the layer's trainable parameters")
    ax.set_title(f"Growth of the adapters: coefficient norm per layer (steps {int(steps_arr[0])}-{int(steps_arr[-1])})"
                 if steps_arr.size else "Growth of the adapters", fontsize=10)
    return fig


# --- training curves (the report) -----------------------------------------------------------------
def curves_figure(records: Sequence[dict]) -> Figure:
    """2 x 2 panels from metrics.jsonl records: loss (train, eval), learning rate, tokens/s, peak memory."""
    fig = new_figure(11.0, 7.0)
    axes = fig.subplots(2, 2)

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return (np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=np.float64)) if points else (np.array([]), np.array([]))

    ax = axes[0, 0]
    steps, loss = series("loss")
    ax.plot(steps, loss, color="#1f4e79", linewidth=1.2, label="train loss")
    steps, eval_loss = series("eval_loss")
    if steps.size:
        ax.plot(steps, eval_loss, color=ENERGY_COLOUR, marker="o", linewidth=1.2, label="eval loss")
    ax.set_title("Loss")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=8)
    panels = ((axes[0, 1], "lr", "Learning rate", "learning rate", 1.0),
              (axes[1, 0], "tokens_per_s", "Throughput", "tokens/s (all ranks)", 1.0),
              (axes[1, 1], "memory", "Peak memory (rank 0)", "GiB", 2.0**-30))
    for ax, key, title, label, factor in panels:
        steps, values = series(key)
        ax.plot(steps, values * factor, color="#1f4e79", linewidth=1.2)
        ax.set_title(title)
        ax.set_ylabel(label)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    return fig
