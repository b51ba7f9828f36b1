"""The run report: self-contained HTML read back (figures, tables, export commands), rendered by headless chromium."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megaspec.config import AdapterConfig
from megaspec.model import adapters_of, save_adapter, summarize
from megaspec.train import figures
from megaspec.train.config import TrainConfig, run_record
from megaspec.train.loop import run_folder_problem
from megaspec.train.monitor import RunLogger, gathered_adapter_tensors, layer_tags
from megaspec.train.report import REPORT, build_report, write_report

from .launcher import check, run_train
from .test_monitor import tiny_model

STEPS = 4
NO_CHROMIUM = "chromium is not installed (bash .ci/chromium-setup.sh installs Debian's chromium)"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, height: int = 3000) -> np.ndarray:
    """Headless chromium's screenshot of `page`, with no network (its own network namespace where possible)."""
    offline = ["unshare", "-n"] if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 else []
    command = [*offline, chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--screenshot={png}", f"--window-size=1200,{height}",
               page.absolute().as_uri()]
    subprocess.run(command, capture_output=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot: {' '.join(command)}"
    return np.asarray(Image.open(png).convert("RGB"))


def embedded_images(page: str) -> dict[str, np.ndarray]:
    """alt text -> decoded pixels of every inline PNG."""
    out = {}
    for alt, data in re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        out[alt] = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return out


def assert_self_contained(page: str) -> None:
    """No URL anywhere, every src/href is inline (data:) or in-page (#), no external style sheet or script."""
    assert "http://" not in page and "https://" not in page and "file://" not in page
    for ref in re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, flags=re.I):
        assert ref.startswith(("data:", "#")), ref
    assert not re.search(r"<(link|script|iframe|object|embed)\b", page, flags=re.I)
    assert "@import" not in page and "url(" not in page


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run folder as the loop writes it: configs, metrics, TensorBoard, figures and the final adapter (no DeepSpeed)."""
    out = tmp_path_factory.mktemp("report") / "run"
    model = tiny_model("ssh")
    cfg = TrainConfig(max_steps=STEPS, adapter=AdapterConfig(n_coeffs=64), output_dir=str(out))
    summary = summarize(model, "ssh")
    out.mkdir(parents=True)
    (out / "train_config.json").write_text(json.dumps(run_record(cfg, None)))
    (out / "adapter_summary.json").write_text(json.dumps(dataclasses.asdict(summary), default=str))
    (out / "ds_config.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    logger = RunLogger(out)
    logger.log_allocation(model)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = {}
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 0.01)
        scalars = {"loss": 3.0 / step, "lr": 0.01, "grad_norm": 1.0, "tokens_per_s": 500.0 + step, "step_time": 0.1}
        if step % 2 == 0:
            scalars.update(eval_loss=2.5 / step, eval_ppl=float(np.exp(2.5 / step)))
        logger.log_scalars(step, scalars)
        tensors = gathered_adapter_tensors(model)
        norms[step] = logger.log_spectral(step, model, tensors)
        if step in (1, STEPS):
            logger.log_spectral_images(step, model, tensors)
    logger.close()
    save_adapter(model, out / "adapter")
    (out / "final_metrics.json").write_text(json.dumps({"step": STEPS, "loss": 0.75}))
    path = write_report(out)
    return dict(out=out, model=model, norms=norms, page=path.read_text(), path=path)


def test_report_is_self_contained_and_holds_every_section(run_folder: dict) -> None:
    page = run_folder["page"]
    assert run_folder["path"] == run_folder["out"] / REPORT
    assert_self_contained(page)
    for heading in ("Training curves", "Budget allocation", "Growth of the adapters", "Spectra", "Trainable parameters",
                    "Export", "Configuration"):
        assert f"<h2>{heading}</h2>" in page
    assert f"finished: {STEPS:,} of {STEPS:,} steps" in page
    out = str(run_folder["out"])
    assert f"python launch/export.py --run {out} --out out/run-merged --format merged" in page
    assert f"python launch/export.py --run {out} --out out/run-peft --format peft" in page
    assert "<td>n_coeffs</td><td>64</td>" in page and "<td>method</td><td>ssh</td>" in page
    images = embedded_images(page)
    assert set(images) == {"training curves", "budget allocation", "growth heatmap"} | {
        f"spectrum of {tag}" for tag in layer_tags(list(adapters_of(run_folder["model"]))).values()}
    assert images["training curves"].shape == (700, 1100, 3)
    for tag in layer_tags(list(adapters_of(run_folder["model"]))).values():  # the monitor's last images, as written
        saved = np.asarray(Image.open(run_folder["out"] / "figures" / "spectrum" / f"{tag}.png").convert("RGB"))
        assert np.array_equal(images[f"spectrum of {tag}"], saved) and saved.shape == (540, 640, 3)


def test_report_allocation_and_parameter_table_match_the_plan(run_folder: dict) -> None:
    page, adapters = run_folder["page"], adapters_of(run_folder["model"])
    tags = layer_tags(list(adapters))
    total = 0
    for name, adapter in adapters.items():
        energy, picks = int(adapter.from_energy.sum()), adapter.coeffs.numel()
        m, n = adapter.shape
        row = (f'<tr><td>{tags[name]}</td><td>{m}x{n}</td><td class="num">{picks:,}</td>'
               f'<td class="num">{energy:,}</td><td class="num">{picks - energy:,}</td></tr>')
        assert row in page
        total += picks
    assert total == 64 * len(adapters)  # the bars sum to the global budget
    counts = [(int(a.from_energy.sum()), int((~a.from_energy).sum())) for a in adapters.values()]
    oracle = figures.allocation_figure(list(tags.values()), [c[0] for c in counts], [c[1] for c in counts])
    assert np.array_equal(embedded_images(page)["budget allocation"], figures.figure_rgb(oracle))


def test_report_growth_heatmap_is_the_logged_norms(run_folder: dict) -> None:
    tags = list(layer_tags(list(adapters_of(run_folder["model"]))).values())
    steps = list(range(1, STEPS + 1))
    grid = np.array([[run_folder["norms"][s][f"spectral/norm/{t}"] for s in steps] for t in tags])
    # TensorBoard stores scalars in float32; the oracle goes through the same rounding
    oracle = figures.growth_figure(tags, steps, grid.astype(np.float32).astype(np.float64))
    assert np.array_equal(embedded_images(run_folder["page"])["growth heatmap"], figures.figure_rgb(oracle))


def test_report_of_an_unfinished_run_draws_from_the_checkpoint(run_folder: dict, tmp_path: Path) -> None:
    run = tmp_path / "unfinished"
    shutil.copytree(run_folder["out"], run)
    (run / "final_metrics.json").unlink()
    shutil.rmtree(run / "figures")
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    shutil.move(run / "adapter", run / "checkpoints" / "step-000004" / "adapter")
    (run / "checkpoints" / "latest").write_text("step-000004")
    page = build_report(run)
    assert_self_contained(page)
    assert "not finished: 4 of 4 steps logged; latest checkpoint step-000004" in page
    images = embedded_images(page)
    assert len([k for k in images if k.startswith("spectrum of")]) == 4  # drawn from the checkpoint's coefficients
    assert "budget allocation" in images and "from the saved adapter checkpoints/step-000004/adapter/" in page


def test_report_cli(run_folder: dict, tmp_path: Path) -> None:
    from launch.report import main

    assert main([str(run_folder["out"]), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text() == run_folder["page"]
    assert main([str(tmp_path)]) == 2  # not a run folder


@pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)
def test_report_renders_in_headless_chromium_without_network(run_folder: dict, tmp_path: Path) -> None:
    shot = screenshot(run_folder["path"], tmp_path / "report.png")
    assert shot.shape == (3000, 1200, 3)
    ink = (shot.min(axis=2) < 200).mean()
    assert ink > 0.05, f"only {ink:.1%} of the page is drawn"
    # the figures rendered: the allocation's energy red and random blue appear on the page
    for colour in (figures.ENERGY_COLOUR, figures.RANDOM_COLOUR):
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(shot.astype(int) - rgb).max(axis=2) <= 3).sum() > 500, colour


@pytest.mark.slow
def test_a_finished_run_writes_its_report_and_overwrite_still_accepts_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--max_steps", "3", "--image_every", "2", "--eval_every", "3", "--save_every", "3", "--output_dir", str(out),
            "--report", "html"]
    check(run_train(args))
    page = (out / REPORT).read_text()
    assert_self_contained(page)
    assert "finished: 3 of 3 steps" in page and (out / "figures" / "allocation.png").exists()
    assert {"figures", "report.html"} <= {p.name for p in out.iterdir()} and run_folder_problem(out) is None
    check(run_train([*args, "--overwrite", "--max_steps", "1"]))
    assert "finished: 1 of 1 steps" in (out / REPORT).read_text()
    if chromium() is not None:
        assert (screenshot(out / REPORT, tmp_path / "shot.png").min(axis=2) < 200).mean() > 0.05
