"""Checkpoints: atomic layout, manifest verification, fallback, pruning, and an exact resume under ZeRO-3."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import deepspeed
import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
from transformers import LlamaForCausalLM

import megaspec
from megaspec.model import adapter_state
from megaspec.train.checkpoint import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    config_hash,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    positions_digest,
    save_checkpoint,
    verify_checkpoint,
)
from megaspec.train.dsconfig import ConfigError
from megaspec.train.global_batch import fit_global_batch, split_problem

from .conftest import tiny_config
from .distributed import REPO, run_ranks
from .launcher import check, cpu_env, losses, metrics, run_train

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    "zero_optimization": {"stage": 3},
    "steps_per_print": 10**9,
}


def init_single_process() -> None:
    """A world of one gloo rank (idempotent: other test modules may have made it already)."""
    if torch_dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")


def make_engine(method: str = "ssh", stage: int = 3) -> tuple[object, torch.nn.Module, megaspec.AdapterSummary]:
    """A tiny LLaMA adapted by `method` inside a ZeRO-`stage` engine; identical for identical calls."""
    init_single_process()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    summary = megaspec.apply_adapters(model, megaspec.AdapterConfig(method=method, n_coeffs=64))
    params = [p for p in model.parameters() if p.requires_grad]
    config = {**DS_CONFIG, "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine, model, summary


def batch(step: int, rank: int = 0) -> torch.Tensor:
    """The batch of `step` on `rank`: a function of both only, as a resumable data loader gives."""
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1000 * step + rank))


def train_step(engine: object, step: int, rank: int = 0) -> float:
    """One optimizer step; returns this rank's loss."""
    ids = batch(step, rank)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def coeffs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gathered coefficient values (via save_adapter's own gather, independent of the checkpoint code)."""
    tensors, _ = adapter_state(model)
    return {k: v for k, v in tensors.items() if k.endswith(".coeffs")}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 4-step run saving at steps 2 and 4, with the states needed to compare a resume."""
    out = tmp_path_factory.mktemp("run")
    engine, model, summary = make_engine()
    losses = {}
    for step in (1, 2):
        losses[step] = train_step(engine, step)
    random.seed(11), np.random.seed(11), torch.manual_seed(11)  # noqa: B018
    state = {"data_position": 2 * 2, "config_hash": config_hash(DS_CONFIG), "base_model": "tiny-llama"}
    step2 = save_checkpoint(engine, model, out, 2, state)
    rng_after_save = (random.random(), float(np.random.rand()), torch.rand(3))
    coeffs2 = coeffs(model)
    for step in (3, 4):
        losses[step] = train_step(engine, step)
    step4 = save_checkpoint(engine, model, out, 4, {**state, "data_position": 4 * 2})
    return dict(out=out, step2=step2, step4=step4, losses=losses, coeffs2=coeffs2, rng=rng_after_save,
                summary=summary, engine=engine, model=model)  # fmt: skip


def test_layout_and_latest(run: dict) -> None:
    out, step4 = run["out"], run["step4"]
    root = out / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-000002", "step-000004"]
    assert (root / LATEST).read_text() == "step-000004"
    assert latest_checkpoint(out) == step4 and verify_checkpoint(step4)
    manifest = json.loads((step4 / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(step4).as_posix() for p in step4.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest) == on_disk
    assert {"trainer_state.json", "adapter/adapter_model.safetensors"} <= on_disk
    assert any(name.startswith("engine/step-000004/") and name.endswith("optim_states.pt") for name in on_disk)
    assert (step4 / "engine" / LATEST).read_text() == "step-000004"  # DeepSpeed's, inside engine/
    state = json.loads((step4 / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 8 and state["method"] == "ssh"
    assert state["positions_digest"] == run["summary"].plan["digest"] == positions_digest(run["model"])
    assert len(state["rng"]) == 1 and state["world_size"] == 1
    assert (state["global_batch"], state["micro_batch"], state["accumulation"], state["global_samples"]) == (2, 2, 1, 8)


def test_training_state_holds_whole_tensors_by_name(run: dict) -> None:
    """training_state.safetensors: every trainable parameter's fp32 master and Adam moments, and Adam's step."""
    from safetensors.torch import load_file

    tensors = load_file(str(run["step4"] / "training_state.safetensors"))
    state = json.loads((run["step4"] / "trainer_state.json").read_text())
    names = [n for n, p in run["model"].named_parameters() if p.requires_grad]
    assert set(tensors) == {f"{kind}/{n}" for n in names for kind in ("param", "exp_avg", "exp_avg_sq")}
    gathered = coeffs(run["model"])  # save_adapter's gather: the same values by another path
    for name in names:
        assert torch.equal(tensors[f"param/{name}"], gathered[name]), name
        assert tensors[f"exp_avg_sq/{name}"].min() >= 0
    assert state["optimizer_step"] == 4 and state["moments"] == ["exp_avg", "exp_avg_sq"]
    assert state["loss_scale"] is None  # fp32: no dynamic loss scaler to carry


def test_fp16_loss_scaler_carries_over_a_resume(monkeypatch) -> None:
    """A restored dynamic loss scaler takes the same scales as the one it was saved from; a fresh one does not."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16 import loss_scaler

    from megaspec.train import training_state

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda *args, **kwargs: 0)  # its overflow message asks

    def engine(scaler):
        return SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler))

    def fresh():
        return loss_scaler.DynamicLossScaler(init_scale=2**16, scale_window=4, min_scale=1, delayed_shift=2,
                                             consecutive_hysteresis=False)

    saved = fresh()
    for overflow in (True, True, True, False, False, False, False, False, True):
        saved.update_scale(overflow)
    state = json.loads(json.dumps(training_state.loss_scale_state(engine(saved))))  # as trainer_state.json holds it
    restored, unrestored = fresh(), fresh()
    training_state.set_loss_scale_state(engine(restored), state)
    scales = {id(s): [] for s in (saved, restored, unrestored)}
    for overflow in (False,) * 5 + (True,) + (False,) * 6:
        for scaler in (saved, restored, unrestored):
            scaler.update_scale(overflow)
            scales[id(scaler)].append(scaler.cur_scale)
    assert scales[id(restored)] == scales[id(saved)]
    assert scales[id(unrestored)] != scales[id(saved)]
    assert training_state.loss_scale_state(engine(loss_scaler.LossScaler(1.0))) is None  # bf16/fp32: static


def test_list_checkpoints(run: dict, tmp_path: Path) -> None:
    lines = list_checkpoints(run["out"])
    assert [line.split()[0] for line in lines] == ["step-000002", "step-000004"]
    assert "step 4  loss -  world size 1  global batch 2  verified  latest" in lines[1]
    for missing in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(ValueError, match="does not exist|holds no checkpoint"):
            list_checkpoints(missing)
    cli = [sys.executable, str(REPO / "launch" / "train.py"), "--list_checkpoints"]
    listed = subprocess.run([*cli, str(run["out"])], env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.splitlines() == lines, listed.stderr
    empty = subprocess.run([*cli, str(tmp_path)], env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and empty.stdout == "", empty.stderr
    assert empty.stderr.splitlines() == [f"train: error: --list_checkpoints: {tmp_path} holds no checkpoint "
                                         f"({tmp_path / CHECKPOINTS} has no step-* folder)"]


@pytest.mark.parametrize(("global_batch", "micro", "world", "accum"), [(8, 4, 1, 2), (8, 4, 2, 1), (8, 2, 2, 2), (12, 2, 3, 2)])
def test_the_global_batch_is_kept_by_accumulation(global_batch, micro, world, accum) -> None:
    saved = {"global_batch": global_batch, "micro_batch": micro, "world_size": 1, "accumulation": global_batch // micro}
    fitted, note = fit_global_batch({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1}, saved, world)
    assert (fitted["train_batch_size"], fitted["gradient_accumulation_steps"]) == (global_batch, accum)
    assert (note is None) == (world == 1)
    _, note = fit_global_batch({"train_batch_size": 4 * global_batch}, saved, 1)
    assert note.endswith(f"train_batch_size {4 * global_batch} does not apply to a resumed run")


def test_a_global_batch_that_cannot_be_split_names_what_would_work() -> None:
    assert split_problem(8, 4, 2) is None
    assert split_problem(4, 4, 2).endswith("use train_micro_batch_size_per_gpu 2 or 1 in --ds_config or 1 rank")
    assert split_problem(4, 4, 4).endswith("use train_micro_batch_size_per_gpu 1 in --ds_config or 1 rank")
    assert split_problem(6, 4, 1) == ("the checkpoint's global batch of 6 samples per update cannot be split over 1 rank with "
                                      "micro-batch 4; use train_micro_batch_size_per_gpu 6, 3, 2 or 1 in --ds_config")
    assert split_problem(8, 3, 2).endswith("use train_micro_batch_size_per_gpu 4, 2 or 1 in --ds_config")
    with pytest.raises(ConfigError, match="global batch of 6 samples per update cannot be split over 4 ranks"):
        fit_global_batch({}, {"global_batch": 6, "micro_batch": 3, "world_size": 2, "accumulation": 1}, 4)


def test_frozen_base_not_saved(run: dict) -> None:
    """exclude_frozen_parameters: the engine files hold the 64 x 8 coefficients' states, not the base."""
    engine_bytes = sum(p.stat().st_size for p in (run["step4"] / "engine").rglob("*.pt"))
    base_bytes = 4 * sum(int(p.ds_numel) for p in run["model"].parameters() if not p.requires_grad)
    assert engine_bytes < base_bytes / 4


def test_resume_matches_uninterrupted_run(run: dict) -> None:
    engine, model, _ = make_engine()
    state = load_checkpoint(engine, run["step2"], expected={"base_model": "tiny-llama"})
    assert state["step"] == 2 and state["data_position"] == 4 and "rng" not in state
    assert (random.random(), float(np.random.rand())) == run["rng"][:2]
    assert torch.equal(torch.rand(3), run["rng"][2])
    restored = coeffs(model)
    assert restored.keys() == run["coeffs2"].keys()
    for key, value in run["coeffs2"].items():
        assert torch.equal(restored[key], value), key
    assert engine.global_steps == 2
    for step in (3, 4):
        assert train_step(engine, step) == pytest.approx(run["losses"][step], abs=1e-6, rel=0)


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_under_zero2_and_without_zero_matches(stage: int, tmp_path: Path) -> None:
    """The training state is set by name under ZeRO-2 (fragments of a flat fp32 copy) and with no ZeRO at all."""
    engine, model, _ = make_engine(stage=stage)
    for step in (1, 2):
        train_step(engine, step)
    path = save_checkpoint(engine, model, tmp_path, 2, {})
    expected = [train_step(engine, step) for step in (3, 4)]
    fresh, _, _ = make_engine(stage=stage)
    assert load_checkpoint(fresh, path)["optimizer_step"] == 2
    assert [train_step(fresh, step) for step in (3, 4)] == pytest.approx(expected, abs=1e-6, rel=0)


def test_load_refuses_mismatch(run: dict) -> None:
    with pytest.raises(ValueError, match="base_model"):
        load_checkpoint(run["engine"], run["step2"], expected={"base_model": "other"})


def test_corruption_falls_back_and_tmp_ignored(run: dict, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run["out"], out)
    root = out / CHECKPOINTS
    (root / ".tmp-step-000006").mkdir()  # a crash mid-save: never a candidate
    (root / ".tmp-step-000006" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(out) == root / "step-000004"
    state_file = root / "step-000004" / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"step": 4', '"step": 5'))
    assert not verify_checkpoint(root / "step-000004")
    assert latest_checkpoint(out) == root / "step-000002"
    with pytest.raises(ValueError, match="failed verification"):
        load_checkpoint(run["engine"], root / "step-000004")
    (root / "step-000002" / "adapter" / "adapter_config.json").unlink()
    assert not verify_checkpoint(root / "step-000002")
    assert latest_checkpoint(out) is None


def test_manifest_damage(run: dict, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run["out"], out)
    step4 = out / CHECKPOINTS / "step-000004"
    manifest = json.loads((step4 / MANIFEST).read_text())
    name = next(iter(manifest["files"]))
    manifest["files"][name]["sha256"] = "0" * 64
    (step4 / MANIFEST).write_text(json.dumps(manifest))
    assert not verify_checkpoint(step4)
    (step4 / MANIFEST).write_text("{not json")
    assert not verify_checkpoint(step4)
    assert latest_checkpoint(out) == out / CHECKPOINTS / "step-000002"


def test_keep_prunes_and_resave(run: dict, tmp_path: Path) -> None:
    engine, model = run["engine"], run["model"]
    out = tmp_path / "prune"
    for step in (1, 2, 3):
        save_checkpoint(engine, model, out, step, {}, keep=2)
    root = out / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-000002", "step-000003"]
    # resumed from step 2 and saving step 3 again: replaced in place, still verified and latest
    save_checkpoint(engine, model, out, 3, {"again": True}, keep=2)
    assert latest_checkpoint(out) == root / "step-000003"
    assert json.loads((root / "step-000003" / "trainer_state.json").read_text())["again"] is True
    # a rewound run saving an earlier step: the later checkpoints are of the abandoned run
    save_checkpoint(engine, model, out, 1, {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-000001"]
    assert latest_checkpoint(out) == root / "step-000001"


def _resume_on_ranks(out: str) -> dict:
    """One rank: train 4 steps saving at 2 and 4, damage 4, resume a fresh engine from what latest finds."""
    rank = torch_dist.get_rank()
    engine, model, _ = make_engine()
    coeffs = model.model.layers[0].self_attn.q_proj.coeffs
    result = {"partition": (coeffs.ds_tensor.numel(), coeffs.ds_numel)}
    losses = {step: train_step(engine, step, rank) for step in (1, 2)}
    torch.manual_seed(100 + rank)
    save_checkpoint(engine, model, out, 2, {"data_position": 4})
    result["rng"] = torch.rand(2)
    losses.update({step: train_step(engine, step, rank) for step in (3, 4)})
    save_checkpoint(engine, model, out, 4, {"data_position": 8})
    result["latest"] = latest_checkpoint(out)
    if rank == 0:
        state_file = result["latest"] / "trainer_state.json"
        state_file.write_text(state_file.read_text().replace('"data_position": 8', '"data_position": 9'))
    torch_dist.barrier()
    result["fallback"] = latest_checkpoint(out)
    fresh, _, _ = make_engine()
    try:
        load_checkpoint(fresh, result["latest"])
    except ValueError as err:
        result["refused"] = str(err)
    state = load_checkpoint(fresh, result["fallback"])
    result["state"] = state
    result["rng_restored"] = torch.rand(2)
    result["resumed"] = {step: train_step(fresh, step, rank) for step in (3, 4)}
    result["losses"] = losses
    return result


@pytest.mark.slow
def test_zero3_two_ranks_resume(tmp_path: Path) -> None:
    ranks = [r.value for r in run_ranks(_resume_on_ranks, 2, args=(str(tmp_path),), timeout=240)]
    root = tmp_path / CHECKPOINTS
    for rank, out in enumerate(ranks):
        local, full = out["partition"]
        assert 0 < local < full  # the coefficients really are partitioned over the two ranks
        assert out["latest"] == root / "step-000004" and out["fallback"] == root / "step-000002"
        assert "failed verification" in out["refused"]  # raised on rank 1 too, not a hang
        assert out["state"]["step"] == 2 and out["state"]["world_size"] == 2
        assert torch.equal(out["rng_restored"], out["rng"]), rank
        for step in (3, 4):
            assert out["resumed"][step] == pytest.approx(out["losses"][step], abs=1e-6, rel=0), (rank, step)
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])  # each rank got its own RNG state back
    assert ranks[0]["losses"][3] != ranks[1]["losses"][3]
    saved = json.loads((root / "step-000002" / "trainer_state.json").read_text())
    assert len(saved["rng"]) == 2
    assert sorted(p.name for p in (root / "step-000002" / "engine" / "step-000002").iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")
    ]


# --- resume on another number of ranks (the training job) ----------------------------------------
RESUME_STEPS = 4
RESUME_ARGS = ["--max_steps", str(RESUME_STEPS), "--save_every", "2", "--eval_every", "0", "--image_every", "100",
               "--n_coeffs", "200"]


def _job(config: Path, out: Path, ranks: int, *extra: str) -> object:
    return run_train(["--ds_config", str(config), *RESUME_ARGS, "--output_dir", str(out), *extra], ranks=ranks)


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_matches_an_uninterrupted_run(first, then, batch8_config, tmp_path) -> None:
    """Stopped at step 2 on `first` ranks, resumed on `then`: the global batch of 8 is kept (accumulation 2 on 1 rank,
    1 on 2), so steps 3 and 4 see the same samples and the same optimizer state as an uninterrupted run.

    Tolerance 1e-4 on losses of about 4.8: the same sums in another order (the all-reduce over ranks vs the
    accumulation over micro-batches) differ by fp32 rounding, about 1e-7 relative, which Adam's division by
    sqrt(v) may amplify in its first steps; one update moves the loss by about 1e-2, so a lost or repeated
    batch, a reset moment or step count, or a different LR would all show.
    """
    reference = tmp_path / "reference"
    check(_job(batch8_config, reference, 1))
    out = tmp_path / "run"
    assert _job(batch8_config, out, first, "--halt_at_step", "2").returncode == 75
    proc = check(_job(batch8_config, out, then, "--resume"))
    accum = 2 // then
    assert (f"resuming step-000002 on {then} rank(s): global batch 8 as in the checkpoint: {then} rank(s) x "
            f"micro-batch 4 x accumulation {accum} (it was written by {first} rank(s) x 4 x {2 // first})") in proc.stdout
    records = metrics(out)
    assert [(r["step"], r["world_size"]) for r in records] == [(1, first), (2, first), (3, then), (4, then)]
    assert losses(out) == pytest.approx(losses(reference), abs=1e-4, rel=0)
    state = json.loads((out / CHECKPOINTS / "step-000004" / "trainer_state.json").read_text())
    assert (state["world_size"], state["accumulation"], state["global_samples"], state["optimizer_step"]) == (then, accum, 32, 4)
