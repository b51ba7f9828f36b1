"""Run monitoring: metrics JSONL, TensorBoard spectral tags against gathered values, position maps against dense pooling."""

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
from megaspec.train import monitor
from megaspec.train.monitor import (
    RunLogger,
    gathered_adapter_tensors,
    layer_tags,
    low_rank_map,
    position_map,
    progress_bar,
    spectral_image,
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
    megaspec.apply_adapters(model, megaspec.AdapterConfig(method=method, n_coeffs=64, rank=4))
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
    assert {f"spectral/positions/{layer}" for layer in LAYERS} == set(tags["images"])
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


def test_tensorboard_images(logged_run: dict) -> None:
    acc = events(logged_run["out"] / "tensorboard")
    tensors = logged_run["tensors"]["model.layers.0.self_attn.v_proj"]
    images = acc.Images("spectral/positions/layers.0.v_proj")
    assert [e.step for e in images] == [1, 3]
    assert (images[-1].height, images[-1].width) == (32, 64)
    pixels = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    lit = pixels.max(axis=2) > 0
    assert lit.sum() == tensors["rows"].numel()
    assert lit[tensors["rows"], tensors["cols"]].all()
    energy = tensors["from_energy"]
    red = pixels[tensors["rows"], tensors["cols"], 0] > 0
    assert torch.equal(torch.from_numpy(red), energy) and 0 < int(energy.sum()) < energy.numel()


def test_spectral_image_levels() -> None:
    rows, cols = torch.tensor([0, 5, 9]), torch.tensor([1, 5, 2])
    coeffs = torch.tensor([0.0, -2.0, 1.0])
    image = spectral_image({"rows": rows, "cols": cols, "coeffs": coeffs}, (10, 10))
    assert image.shape == (3, 10, 10)
    assert image[0, rows, cols].tolist() == pytest.approx([0.25, 1.0, 0.625])  # zero stays visible
    assert int((image[0] > 0).sum()) == 3


def test_position_map_matches_dense_max_pool() -> None:
    m, n, count = 512, 768, 5000
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(m * n, generator=g)[:count]
    rows, cols, values = flat // n, flat % n, torch.randn(count, generator=g)
    mag, occupied = position_map(rows, cols, values, (m, n))
    dense = torch.zeros(m, n)
    dense[rows, cols] = values.abs()
    hits = torch.zeros(m, n)
    hits[rows, cols] = 1.0
    assert mag.shape == (256, 256)
    assert torch.equal(mag, F.max_pool2d(dense[None], (2, 3))[0])
    assert torch.equal(occupied, F.max_pool2d(hits[None], (2, 3))[0] > 0)
    small, _ = position_map(rows[:10] % 40, cols[:10] % 30, values[:10], (40, 30))
    assert small.shape == (40, 30)


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
    assert written == [f"spectral/positions/{layer}" for layer in LAYERS]
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
    return {
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
    assert len(first["images"]) == 4
    for key, value in first["oracle"].items():
        assert torch.equal(first["tensors"][key.removesuffix(".coeffs")]["coeffs"], value)
        layer = key.removeprefix("model.").replace("self_attn.", "").removesuffix(".coeffs")
        assert first["stats"][f"spectral/norm/{layer}"] == pytest.approx(float(value.double().norm()), rel=1e-12)
        assert float(value.abs().max()) > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["world_size"] == 2
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
