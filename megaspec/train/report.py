"""The run report: one self-contained HTML page of a run folder (`python launch/report.py runs/X`).

Everything is read from what the run wrote, nothing is recomputed from the model:
- metrics.jsonl: loss, eval loss, learning rate, tokens/s and memory curves;
- the adapter (adapter/ of a finished run, else the latest checkpoint's): the budget allocation
  and, when the run left no figures, spectrum images without the W0 background;
- TensorBoard's spectral/norm/<layer> scalars: the growth heatmap;
- figures/: the monitor's latest spectrum images (with the W0 background);
- train_config.json, ds_config.json, adapter_summary.json, final_metrics.json: the tables.

Figures are inline base64 PNGs and the style sheet is inline: the page needs no server and no
network, and references nothing outside itself (tests/test_report.py checks, and renders it in
headless chromium). A finished run writes it as report.html at its end.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from megaspec.train import figures
from megaspec.train.checkpoint import CHECKPOINTS, read_latest
from megaspec.train.monitor import FIGURES, MAX_SPECTRUM_IMAGES, layer_tags
from megaspec.train.trackers import tensorboard_scalars

REPORT = "report.html"

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1150px;
       padding: 24px; color: #1c2833; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; border-bottom: 1px solid #d5d8dc;
     padding-bottom: 4px; margin-top: 2em; }
.status { color: #566573; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #d5d8dc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f6f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 8px; }
pre { background: #f4f6f7; padding: 10px; overflow-x: auto; font-size: 0.85em; }
.note { color: #566573; font-size: 0.9em; }
"""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a torn last line (a crash) is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def adapter_folder(run: Path) -> Path | None:
    """The finished adapter, else the latest checkpoint's, else None."""
    if (run / "adapter" / "adapter_model.safetensors").exists():
        return run / "adapter"
    latest = read_latest(run / CHECKPOINTS)
    folder = run / CHECKPOINTS / latest / "adapter" if latest else None
    return folder if folder is not None and (folder / "adapter_model.safetensors").exists() else None


def adapter_tensors(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-layer tensors (plan buffers and parameters) of a saved adapter, and its manifest (shape, plan, params)."""
    from safetensors.torch import load_file

    layers = json.loads((folder / "adapter_layers.json").read_text())
    flat = load_file(str(folder / "adapter_model.safetensors"))
    out = {name: {key: flat[f"{name}.{key}"] for key in info["plan"] + info["params"] if f"{name}.{key}" in flat}
           for name, info in layers.items()}
    return out, layers


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _fig(fig: Any, alt: str) -> str:
    return _img(figures.figure_png(fig), alt)


def _table(rows: list[list[Any]], head: list[str] | None = None, numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table>" + ("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else "")]
    for row in rows:
        cells = "".join(
            f'<td class="num">{html.escape(_fmt(v))}</td>' if i in numeric else f"<td>{html.escape(_fmt(v))}</td>"
            for i, v in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    return "\n".join(out) + "</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _status(run: Path, config: dict[str, Any], records: list[dict[str, Any]], final: dict[str, Any] | None) -> str:
    steps = records[-1]["step"] if records else 0
    planned = config.get("max_steps")
    if final is not None:
        return f"finished: {final.get('step', steps):,} of {planned:,} steps" if planned else "finished"
    latest = read_latest(run / CHECKPOINTS)
    where = f"; latest checkpoint {latest}" if latest else "; no checkpoint yet"
    return f"not finished: {steps:,} of {planned or '?'} steps logged{where}"


def _summary_rows(config: dict[str, Any], summary: dict[str, Any] | None, records: list[dict[str, Any]],
                  final: dict[str, Any] | None) -> list[list[Any]]:
    rows: list[list[Any]] = [["method", config.get("method")], ["model", config.get("model") or "embedded tiny LLaMA"],
                             ["dataset", config.get("dataset") or "embedded instruction task"]]
    if summary:
        share = 100.0 * summary["trainable"] / max(summary.get("total") or 1, 1)
        rows.append(["trainable parameters", f"{summary['trainable']:,} of {summary.get('total', 0):,} ({share:.4f} %) "
                                             f"in {len(summary.get('layers', []))} layers"])
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if losses:
        rows.append(["train loss (first, last logged)", f"{losses[0]:.4f}, {losses[-1]:.4f}"])
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        rows.append(["eval loss (last)", f"{evals[-1]['eval_loss']:.4f} (ppl {evals[-1].get('eval_ppl', float('nan')):.3f}) "
                                          f"at step {evals[-1]['step']:,}"])
    speeds = sorted(r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float)))
    if speeds:
        rows.append(["tokens/s (median over steps, all ranks)", f"{speeds[len(speeds) // 2]:,.0f}"])
    memory = [r["memory"] for r in records if isinstance(r.get("memory"), (int, float))]
    if memory:
        rows.append(["peak memory (rank 0)", f"{max(memory) / 2**30:.2f} GiB"])
    if records:
        rows.append(["ranks", records[-1].get("world_size", 1)])
        stamps = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
        if len(stamps) > 1:
            rows.append(["wall time between first and last logged step", f"{stamps[-1] - stamps[0]:,.0f} s"])
    return rows


def _allocation(tensors: dict[str, dict[str, Any]] | None, summary: dict[str, Any] | None, run: Path) -> tuple[str, list]:
    """(the allocation figure's HTML, per-layer rows: tag, shape, trainable, energy, random)."""
    if tensors is None or summary is None:
        png = run / FIGURES / "allocation.png"
        return (_img(png.read_bytes(), "budget allocation") if png.exists() else '<p class="note">No adapter saved yet.</p>'), []
    names = [layer["name"] for layer in summary["layers"] if layer["name"] in tensors] or list(tensors)
    trainable = {layer["name"]: int(layer["trainable"]) for layer in summary["layers"]}
    tags = layer_tags(names)
    counts = [figures.allocation_counts(tensors[n], trainable.get(n, 0)) for n in names]
    known = all(c[2] for c in counts)
    unit = "coefficients" if any("rows" in tensors[n] for n in names) else "trainable parameters"
    fig = figures.allocation_figure([tags[n] for n in names], [c[0] for c in counts], [c[1] for c in counts],
                                    origin_known=known, unit=unit)
    shapes = {layer["name"]: layer["shape"] for layer in summary["layers"]}
    rows = [[tags[n], "x".join(str(s) for s in shapes.get(n, [])), trainable.get(n, 0),
             c[0] if known else "", c[1] if known else ""] for n, c in zip(names, counts, strict=True)]
    return _fig(fig, "budget allocation"), rows


def _growth(run: Path, names: list[str]) -> str:
    scalars = tensorboard_scalars(run / "tensorboard", "spectral/norm/")
    if not scalars:
        png = run / FIGURES / "growth.png"
        return _img(png.read_bytes(), "growth heatmap") if png.exists() else '<p class="note">No coefficient norms logged.</p>'
    import numpy as np

    order = [layer_tags(names)[n] for n in names] if names else []
    tags = [t for t in order if f"spectral/norm/{t}" in scalars] or sorted(t.removeprefix("spectral/norm/") for t in scalars)
    steps = sorted({s for points in scalars.values() for s, _ in points})
    grid = np.full((len(tags), len(steps)), np.nan)
    column = {s: i for i, s in enumerate(steps)}
    for row, tag in enumerate(tags):
        for s, value in scalars.get(f"spectral/norm/{tag}", []):
            grid[row, column[s]] = value
    return _fig(figures.growth_figure(tags, steps, grid), "growth heatmap")


def _spectra(run: Path, tensors: dict[str, dict[str, Any]] | None, manifest: dict[str, Any] | None, step: int) -> str:
    """The monitor's latest spectrum PNGs in layer order; else drawn from the adapter (no W0 background)."""
    folder = run / FIGURES / "spectrum"
    if tensors:
        tags = layer_tags(list(tensors))
        order = {tag: i for i, tag in enumerate(tags.values())}
    else:
        order = {}
    saved = sorted(folder.glob("*.png"), key=lambda p: (order.get(p.stem, len(order)), p.stem)) if folder.is_dir() else []
    if saved:
        cells = [_img(p.read_bytes(), f"spectrum of {p.stem}") for p in saved[:MAX_SPECTRUM_IMAGES]]
        return '<div class="grid">' + "".join(cells) + "</div>"
    if not tensors or not manifest:
        return '<p class="note">No spectrum images.</p>'
    cells = []
    for name in figures.spectrum_layers(list(tensors), 4):
        layer = tensors[name]
        if {"rows", "cols", "coeffs"} <= layer.keys():
            shape = tuple(manifest[name]["shape"])
            title = f"{tags[name]} ({shape[0]}x{shape[1]}): {layer['coeffs'].numel():,} coefficients, step {step}"
            cells.append(_fig(figures.spectrum_figure(title, shape, layer["rows"], layer["cols"], layer["coeffs"],
                                                      layer.get("from_energy")), f"spectrum of {tags[name]}"))
    return '<div class="grid">' + "".join(cells) + "</div>" if cells else '<p class="note">No sparse spectra in this run.</p>'


def export_commands(run: Path, method: str | None) -> list[str]:
    """The commands that turn this run into a served model (README "From a finished run to a served model")."""
    r = shlex.quote(str(run))
    name = shlex.quote(f"out/{run.name}")
    lines = [
        f"python launch/export.py --run {r} --out {name}-merged --format merged",
        f"python launch/export.py --run {r} --out {name}-peft --format peft",
    ]
    if method not in ("fourierft", "lora"):
        lines.append(f"python launch/export.py --run {r} --out {name}-peft64 --format peft --lora_rank 64")
    lines += [
        f"python launch/export.py --run {r} --out {name}-native --format megaspec",
        f"python launch/generate.py --run {r} --greedy --prompt \"...\"",
    ]
    return lines


def build_report(run: str | Path) -> str:
    """The HTML page of a run folder (see the module docstring for what it reads)."""
    run = Path(run)
    config = _json(run / "train_config.json")
    if config is None:
        raise FileNotFoundError(f"{run} holds no train_config.json: not a megaspec run folder")
    summary = _json(run / "adapter_summary.json")
    final = _json(run / "final_metrics.json")
    records = read_jsonl(run / "metrics.jsonl")
    folder = adapter_folder(run)
    tensors, manifest = adapter_tensors(folder) if folder else (None, None)
    names = [layer["name"] for layer in summary["layers"]] if summary else list(tensors or {})
    step = records[-1]["step"] if records else 0
    allocation, layer_rows = _allocation(tensors, summary, run)
    if not layer_rows and summary:
        tags = layer_tags(names)
        layer_rows = [[tags[layer["name"]], "x".join(map(str, layer["shape"])), layer["trainable"], "", ""]
                      for layer in summary["layers"]]
    has_origin = any(row[3] != "" for row in layer_rows)
    head = ["layer", "shape (M x N)", "trainable"] + (["energy picks", "random picks"] if has_origin else [])
    layer_rows = [row if has_origin else row[:3] for row in layer_rows]
    ds_config = _json(run / "ds_config.json")
    curves = _fig(figures.curves_figure(records), "training curves") if records else '<p class="note">Nothing logged yet.</p>'
    where = f"saved adapter {html.escape(str(folder.relative_to(run)))}/" if folder else "plan's figure (no adapter saved yet)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>megaspec run {html.escape(run.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>megaspec run <code>{html.escape(run.name)}</code></h1>",
        f'<p class="status">{html.escape(_status(run, config, records, final))}</p>',
        _table(_summary_rows(config, summary, records, final)),
        "<h2>Training curves</h2>", curves,
        "<h2>Budget allocation</h2>",
        '<p class="note">Coefficients per adapted layer in model order, as the plan chose them before training '
        f"(stacked energy vs random picks where the method records the origin); from the {where}.</p>",
        allocation,
        "<h2>Growth of the adapters</h2>",
        '<p class="note">Norm of each layer\'s trainable parameters at every logged step (they start at zero).</p>',
        _growth(run, names),
        "<h2>Spectra</h2>",
        '<p class="note">Each picked frequency at its centred position (low frequencies in the middle); marker area '
        "grows with |c|; the grey background is the frozen weight's spectral energy when the run drew it.</p>",
        _spectra(run, tensors, manifest, step),
        "<h2>Trainable parameters</h2>",
        _table(layer_rows, head, numeric={2, 3, 4}),
        "<h2>Export</h2>",
        "<pre>" + html.escape("\n".join(export_commands(run, config.get("method")))) + "</pre>",
        "<h2>Configuration</h2>",
        _table([[k, v] for k, v in config.items()], ["setting", "value"]),
        "<details><summary>DeepSpeed config (resolved)</summary><pre>"
        + html.escape(json.dumps(ds_config, indent=1) if ds_config else "none") + "</pre></details>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the report (default `<run>/report.html`), replaced whole (temp name, then rename)."""
    run = Path(run)
    path = Path(out) if out else run / REPORT
    text = build_report(run)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report_or_warn(run: str | Path) -> Path | None:
    """write_report at the end of a run: a failure is one warning line, never the end of the run."""
    try:
        return write_report(run)
    except Exception as exc:
        print(f"train: warning: report.html not written ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); `python launch/report.py {run}` retries",
              file=sys.stderr, flush=True)
        return None
