"""Run monitoring: metrics JSONL, TensorBoard spectral tags and figures against gathered values, |B A| maps against dense pooling."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import deepspeed
import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import LlamaForCausalLM

import megaspec
from megaspec.model import adapter_state
from megaspec.train import figures, monitor
from megaspec.train.monitor import (
    RunLogger,
    gathered_adapter_tensors,
    layer_figure,
    layer_tags,
    low_rank_map,
    progress_bar,
)

from .conftest import tiny_config
from .distributed import run_ranks

LAYERS = ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time", "memory", "world_size"}


def init_single_process() -> None:
    """A world of one gloo rank (idempotent: other test modules may have made it already)."""
    if torch_dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")


def tiny_model(method: str) -> torch.nn.Module:
    """A 2-layer LLaMA (GQA: v_proj is 32 x 64) with q_proj/v_proj adapted by `method`."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    megaspec.apply_adapters(model, megaspec.AdapterConfig(method=method, n_coeffs=64, lora_rank=4))
    return model


def events(log_dir: Path) -> EventAccumulator:
    """Every event TensorBoard wrote (size_guidance 0: keep all)."""
    guidance = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0}
    return EventAccumulator(str(log_dir), size_guidance=guidance).Reload()


def zero3_engine(model: torch.nn.Module) -> object:
    """A ZeRO-3 engine (AdamW, torch implementation) over the model's trainable parameters."""
    init_single_process()
    params = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine


def train_step(engine: object, step: int, rank: int = 0) -> torch.Tensor:
    """One optimizer step on a batch fixed by (step, rank); returns the loss."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1000 * step + rank))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


def oracle_coeffs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gathered coefficients via save_adapter's gather (collective), independent of the monitor."""
    return {k: v for k, v in adapter_state(model)[0].items() if k.endswith(".coeffs")}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three ZeRO-3 training steps, each logged; images at steps 1 and 3; oracle coefficients per step."""
    out = tmp_path_factory.mktemp("monitor")
    init_single_process()
    model = tiny_model("ssh")
    engine = zero3_engine(model)
    logger = RunLogger(out)
    oracle, losses, stats = {}, {}, {}
    for step in (1, 2, 3):
        loss = train_step(engine, step)
        losses[step] = loss.item()
        logger.log_scalars(step, {"loss": loss, "lr": 1e-2, "grad_norm": 0.5, "tokens_per_s": 100.0, "step_time": 0.1})
        tensors = gathered_adapter_tensors(model)
        stats[step] = logger.log_spectral(step, model, tensors)
        if step in (1, 3):
            logger.log_spectral_images(step, model, tensors)
        oracle[step] = oracle_coeffs(model)
    logger.close()
    return dict(out=out, oracle=oracle, losses=losses, stats=stats, tensors=tensors, model=model)


def test_metrics_jsonl(logged_run: dict) -> None:
    lines = (logged_run["out"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3 and [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert REQUIRED <= record.keys()
        assert record["world_size"] == 1 and record["memory"] > 10 * 2**20
        assert record["loss"] == pytest.approx(logged_run["losses"][record["step"]])


def test_tensorboard_spectral_tags(logged_run: dict) -> None:
    acc = events(logged_run["out"] / "tensorboard")
    tags = acc.Tags()
    expected = {f"spectral/{kind}/{layer}" for kind in ("norm", "max_abs") for layer in LAYERS}
    assert expected | {"spectral/global_norm", "train/loss", "train/lr", "train/memory"} <= set(tags["scalars"])
    assert "spectral/coeffs" in tags["histograms"]
    assert {f"spectral/positions/{layer}" for layer in LAYERS} | {"spectral/growth"} == set(tags["images"])
    assert [e.step for e in acc.Histograms("spectral/coeffs")] == [1, 2, 3]
    assert acc.Histograms("spectral/coeffs")[-1].histogram_value.num == 4 * 64
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(list(logged_run["losses"].values()))
    for step_index, step in enumerate((1, 2, 3)):
        oracle = logged_run["oracle"][step]
        total = 0.0
        for layer in LAYERS:
            i = layer.split(".")[1]
            coeffs = oracle[f"model.layers.{i}.self_attn.{layer.split('.')[2]}.coeffs"].double()
            norm = float(torch.linalg.vector_norm(coeffs))
            total += norm**2
            assert norm > 1e-3  # the coefficients did grow: the comparison is not 0 == 0
            assert acc.Scalars(f"spectral/norm/{layer}")[step_index].value == pytest.approx(norm, rel=1e-6)
            assert acc.Scalars(f"spectral/max_abs/{layer}")[step_index].value == pytest.approx(
                float(coeffs.abs().max()), rel=1e-6
            )
        assert acc.Scalars("spectral/global_norm")[step_index].value == pytest.approx(total**0.5, rel=1e-6)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_tensorboard_images(logged_run: dict) -> None:
    """Each spectrum image is the figure of the gathered coefficients over W0's energy; the PNG copy is the last one."""
    acc = events(logged_run["out"] / "tensorboard")
    model, tensors = logged_run["model"], logged_run["tensors"]
    for layer in LAYERS:
        name = f"model.layers.{layer.split('.')[1]}.self_attn.{layer.split('.')[2]}"
        images = acc.Images(f"spectral/positions/{layer}")
        assert [e.step for e in images] == [1, 3]
        assert (images[-1].height, images[-1].width) == (540, 640)
        adapter = dict(model.named_modules())[name]
        background = figures.energy_background(figures.weight_energy(adapter.base.weight.detach(), "dht"))
        rgb = figures.figure_rgb(layer_figure(layer, tensors[name], adapter.shape, 3, background))
        oracle = _png(figures.figure_png(rgb, figures.SPECTRUM_COLOURS))  # a palette PNG: at most 256 colours
        assert np.abs(oracle.astype(int) - rgb).mean() < 1.0  # close to the figure's RGB pixels
        logged = _png(images[-1].encoded_image_string)
        assert np.array_equal(logged, oracle)
        assert np.array_equal(_png((logged_run["out"] / "figures" / "spectrum" / f"{layer}.png").read_bytes()), oracle)
        assert not np.array_equal(_png(images[0].encoded_image_string), logged)  # the coefficients grew between


def test_growth_image_reads_back_as_the_logged_norms(logged_run: dict) -> None:
    acc = events(logged_run["out"] / "tensorboard")
    images = acc.Images("spectral/growth")
    assert [e.step for e in images] == [1, 3]
    norms = np.array([[logged_run["stats"][step][f"spectral/norm/{layer}"] for step in (1, 2, 3)] for layer in LAYERS])
    oracle = figures.growth_figure(LAYERS, [1, 2, 3], norms)  # the layout; the pixels are read from the logged image
    logged = _png(images[-1].encoded_image_string)
    assert logged.shape == figures.figure_rgb(oracle).shape
    ax, top = oracle.axes[0], float(norms.max())
    table = (figures.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round()
    for row, layer in enumerate(LAYERS):
        _, i, proj = layer.split(".")
        for step in (1, 2, 3):
            x, y = ax.transData.transform((step, row))
            colour = logged[int(round(oracle.bbox.height - y)), int(round(x))].astype(int)
            value = float(np.argmin(((table - colour) ** 2).sum(axis=1))) / 255 * top
            coeffs = logged_run["oracle"][step][f"model.layers.{i}.self_attn.{proj}.coeffs"]
            assert value == pytest.approx(float(coeffs.double().norm()), abs=top / 255 * 1.5)


def test_allocation_image_bars_sum_to_the_budget(tmp_path: Path) -> None:
    model = tiny_model("ssh")
    logger = RunLogger(tmp_path)
    assert logger.log_allocation(model) == "spectral/allocation"
    logger.close()
    image = events(tmp_path / "tensorboard").Images("spectral/allocation")
    assert [e.step for e in image] == [0] and (image[0].height, image[0].width) == (420, 640)
    assert np.array_equal(_png(image[0].encoded_image_string), _png((tmp_path / "figures" / "allocation.png").read_bytes()))
    adapters = megaspec.model.adapters_of(model)
    counts = [figures.allocation_counts(a.plan_state(), a.trainable_count()) for a in adapters.values()]
    assert sum(c[0] + c[1] for c in counts) == 64 * 4 and all(c[2] for c in counts)
    oracle = figures.allocation_figure(LAYERS, [c[0] for c in counts], [c[1] for c in counts])
    assert np.array_equal(_png(image[0].encoded_image_string), figures.figure_rgb(oracle))


def test_figure_failure_never_ends_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    model = tiny_model("ssh")
    logger = RunLogger(tmp_path)
    monkeypatch.setattr(figures, "spectrum_figure", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(figures, "allocation_figure", lambda *a, **k: 1 / 0)
    assert logger.log_allocation(model) is None
    logger.log_spectral(1, model)
    assert logger.log_spectral_images(1, model) == ["spectral/growth"]
    assert logger.log_spectral_images(2, model) == ["spectral/growth"]
    logger.close()
    err = capsys.readouterr().err
    assert err.count("TensorBoard images at step 1 not written (ZeroDivisionError") == 1 and "step 2" not in err
    assert "allocation image at step 0 not written" in err


def test_low_rank_map_matches_dense_max_pool() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 768, generator=g), torch.randn(512, 4, generator=g)
    expected = F.max_pool2d((b @ a).abs()[None], (2, 3))[0]
    assert torch.allclose(low_rank_map(a, b, block_rows=100), expected, rtol=1e-5, atol=1e-6)


def test_lora_without_engine(tmp_path: Path) -> None:
    model = tiny_model("lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    logger = RunLogger(tmp_path)
    stats = logger.log_spectral(5, model)
    written = logger.log_spectral_images(5, model)
    logger.close()
    assert written == [f"spectral/positions/{layer}" for layer in LAYERS] + ["spectral/growth"]
    a = model.model.layers[1].self_attn.q_proj.lora_A.detach()
    b = model.model.layers[1].self_attn.q_proj.lora_B.detach()
    assert stats["spectral/norm/layers.1.q_proj"] == pytest.approx(float(torch.cat([a.flatten(), b.flatten()]).norm()))
    assert set(events(tmp_path / "tensorboard").Tags()["images"]) == set(written)


def test_other_ranks_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor, "rank", lambda: 1)
    model = tiny_model("ssh")
    logger = RunLogger(tmp_path / "run")
    logger.log_scalars(1, {"loss": 1.0})
    assert logger.log_spectral(1, model) == {} and logger.log_spectral_images(1, model) == []
    assert gathered_adapter_tensors(model) == {} and gathered_adapter_tensors(model, rank0_only=False)
    logger.close()
    assert not (tmp_path / "run").exists()
    assert progress_bar(10).disable


def test_layer_tags() -> None:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.12.mlp.down_proj", "lm_head"]
    assert layer_tags(names) == dict(zip(names, ["layers.0.q_proj", "layers.12.down_proj", "lm_head"], strict=True))
    clash = ["a.blocks.0.attn.q", "a.blocks.0.cross.q"]
    assert layer_tags(clash) == {name: name for name in clash}


def _log_on_ranks(out: str) -> dict:
    """One rank: a ZeRO-3 step, then every logging call (the spectral ones are collective)."""
    rank = torch_dist.get_rank()
    model = tiny_model("ssh")
    engine = zero3_engine(model)
    coeffs = model.model.layers[0].self_attn.q_proj.coeffs
    loss = train_step(engine, 1, rank)
    logger = RunLogger(out)
    logger.log_scalars(1, {"loss": loss})
    tensors = gathered_adapter_tensors(model)
    stats = logger.log_spectral(1, model, tensors)
    images = logger.log_spectral_images(1, model, tensors)
    logger.close()
    q_proj = model.model.layers[0].self_attn.q_proj
    with deepspeed.zero.GatheredParameters([q_proj.base.weight], modifier_rank=None):  # the oracle: the whole W0
        background = figures.energy_background(figures.weight_energy(q_proj.base.weight.detach(), "dht"))
    return {
        "backgrounds": logger.backgrounds,
        "background_oracle": background,
        "partition": (coeffs.ds_tensor.numel(), coeffs.ds_numel),
        "tensors": tensors,
        "stats": stats,
        "images": images,
        "oracle": oracle_coeffs(model),
    }


def test_resume_drops_what_was_logged_after_the_checkpoint(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log_scalars(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the crash tore the last line
    logger = RunLogger(tmp_path, resume_step=2)
    logger.log_scalars(3, {"loss": 30.0})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    scalars = events(tmp_path / "tensorboard").Scalars("train/loss")
    assert [(e.step, e.value) for e in scalars] == [(1, 1.0), (2, 2.0), (3, 30.0)]


@pytest.mark.slow
def test_zero3_two_ranks_rank0_logs_gathered_values(tmp_path: Path) -> None:
    first, second = (r.value for r in run_ranks(_log_on_ranks, 2, args=(str(tmp_path),), timeout=240))
    assert 0 < first["partition"][0] < first["partition"][1]  # each rank holds part of the coefficients
    assert second["tensors"] == {} and second["stats"] == {} and second["images"] == []
    assert len(first["images"]) == 5  # 4 layers and the growth heatmap
    # W0 backgrounds: gathered on both ranks (collective), computed on rank 0 only, equal to the whole weight's
    assert set(first["backgrounds"]) == set(second["backgrounds"]) == {f"model.{layer.replace('.q', '.self_attn.q').replace('.v', '.self_attn.v')}" for layer in LAYERS}
    assert all(v is None for v in second["backgrounds"].values())
    assert np.array_equal(first["backgrounds"]["model.layers.0.self_attn.q_proj"], first["background_oracle"])
    for key, value in first["oracle"].items():
        assert torch.equal(first["tensors"][key.removesuffix(".coeffs")]["coeffs"], value)
        layer = key.removeprefix("model.").replace("self_attn.", "").removesuffix(".coeffs")
        assert first["stats"][f"spectral/norm/{layer}"] == pytest.approx(float(value.double().norm()), rel=1e-12)
        assert float(value.abs().max()) > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["world_size"] == 2
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_resumed_logger_continues_the_growth_heatmap(tmp_path: Path) -> None:
    model = tiny_model("ssh")
    logger = RunLogger(tmp_path)
    stats = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.coeffs.add_(0.5)
        stats[step] = logger.log_spectral(step, model)
    logger.close()
    resumed = RunLogger(tmp_path, resume_step=2)  # the crash came after step 3's events; the checkpoint is step 2
    assert sorted(resumed.norms) == [1, 2]
    for step in (1, 2):
        assert resumed.norms[step] == {k.removeprefix("spectral/norm/"): pytest.approx(v, rel=1e-6)
                                       for k, v in stats[step].items() if k.startswith("spectral/norm/")}
    resumed.close()
