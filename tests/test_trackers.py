"""--report_to: the tracker list, a missing package skipped in one line, W&B offline and MLflow's file store read back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megaspec.train import trackers
from megaspec.train.dsconfig import ConfigError
from megaspec.train.monitor import RunLogger, layer_tags
from megaspec.train.trackers import parse_report_to

from .test_monitor import events, tiny_model


@pytest.mark.parametrize(("text", "expected"), [
    ("tensorboard", ["tensorboard"]),
    ("tensorboard, wandb,mlflow", ["tensorboard", "wandb", "mlflow"]),
    ("wandb,wandb", ["wandb"]),
    ("all", ["tensorboard", "wandb", "mlflow"]),
    ("none", []),
    ("", []),
])
def test_parse_report_to(text: str, expected: list[str]) -> None:
    assert parse_report_to(text) == expected


def test_unknown_tracker_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"--report_to tensorboard,comet: unknown tracker 'comet'; choose from tensorboard, wandb, mlflow"):
        parse_report_to("tensorboard,comet")


def log_three_steps(out: Path, report_to: str) -> dict:
    """Scalars, spectral stats and figures of three steps through RunLogger; returns what was logged."""
    model = tiny_model("ssh")
    logger = RunLogger(out, report_to=report_to, config={"method": "ssh", "n_coeffs": 64})
    names = logger.writer.names
    logger.log_allocation(model)
    stats = {}
    for step in (1, 2, 3):
        logger.log_scalars(step, {"loss": 1.0 / step, "lr": 0.01 * step})
        stats[step] = logger.log_spectral(step, model)
        logger.log_spectral_images(step, model)
    logger.close()
    return {"names": names, "stats": stats, "tags": list(layer_tags(list(__import__("megaspec").model.adapters_of(model))).values())}


def test_missing_package_is_skipped_in_one_line_and_tensorboard_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(trackers, "available", lambda name: name == "tensorboard")
    logged = log_three_steps(tmp_path, "tensorboard,wandb,mlflow")
    err = capsys.readouterr().err.splitlines()
    assert logged["names"] == ["tensorboard"]
    assert [line for line in err if "--report_to" in line] == [
        "train: --report_to wandb: the wandb package is not installed, so wandb is skipped (pip install wandb)",
        "train: --report_to mlflow: the mlflow package is not installed, so mlflow is skipped (pip install mlflow)",
    ]
    assert [e.value for e in events(tmp_path / "tensorboard").Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])


def test_none_writes_metrics_jsonl_and_figures_only(tmp_path: Path) -> None:
    logged = log_three_steps(tmp_path, "none")
    assert logged["names"] == [] and not (tmp_path / "tensorboard").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "figures" / "allocation.png").exists() and (tmp_path / "figures" / "growth.png").exists()


def test_a_failing_tracker_is_dropped_with_one_line(tmp_path: Path, capsys) -> None:
    class Broken:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise RuntimeError("service unreachable")
            return fail

    logger = RunLogger(tmp_path)
    logger.writer.others["wandb"] = Broken()
    for step in (1, 2):
        logger.log_scalars(step, {"loss": float(step)})
    logger.close()
    err = capsys.readouterr().err
    assert err.count("wandb add_scalar failed (RuntimeError: service unreachable); wandb is off for the rest of the run") == 1
    assert [e.value for e in events(tmp_path / "tensorboard").Scalars("train/loss")] == [1.0, 2.0]


def wandb_history(path: Path) -> dict[int, dict]:
    """step -> logged values, read from an offline run's .wandb file (LevelDB log blocks of wandb Record protos)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, out = path.read_bytes(), 7, b"", {}  # 7 bytes of file header (':W&B', version)
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                out.setdefault(int(items["_step"]), {}).update(items)
    return out


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional: pip install wandb)")
def test_wandb_offline_run_reads_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = log_three_steps(tmp_path, "tensorboard,wandb")
    assert logged["names"] == ["tensorboard", "wandb"]
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    history = wandb_history(next(run.glob("*.wandb")))
    assert sorted(history) == [0, 1, 2, 3]
    assert history[0]["spectral/allocation/_type"] == "image-file" and history[0]["spectral/allocation/width"] == 640
    for step in (1, 2, 3):
        assert history[step]["train/loss"] == pytest.approx(1.0 / step)
        for tag in logged["tags"]:
            assert history[step][f"spectral/norm/{tag}"] == pytest.approx(logged["stats"][step][f"spectral/norm/{tag}"])
        assert history[step]["spectral/growth/_type"] == "image-file"
        assert history[step]["spectral/positions/layers.0.q_proj/height"] == 540
    assert list((run / "files" / "media" / "images" / "spectral").glob("growth_*.png"))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (optional: pip install mlflow)")
def test_mlflow_file_store_in_the_run_folder_reads_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logged = log_three_steps(tmp_path, "mlflow")
    assert logged["names"] == ["mlflow"] and not (tmp_path / "tensorboard").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlflow").absolute().as_uri())
    experiment = client.get_experiment_by_name("megaspec")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["n_coeffs"] == "64"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    tag = logged["tags"][0]
    norms = sorted(client.get_metric_history(run.info.run_id, f"spectral/norm/{tag}"), key=lambda m: m.step)
    assert [m.value for m in norms] == pytest.approx([logged["stats"][s][f"spectral/norm/{tag}"] for s in (1, 2, 3)])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("spectral.growth" in path for path in artifacts), artifacts
    assert np.isfinite(run.data.metrics["spectral/global_norm"])


def resume_two_steps(out: Path, report_to: str) -> None:
    """A --resume after log_three_steps: steps 4 and 5 through a RunLogger that resumes at step 3."""
    logger = RunLogger(out, resume_step=3, report_to=report_to, config={"method": "ssh", "n_coeffs": 64, "max_steps": 5})
    for step in (4, 5):
        logger.log_scalars(step, {"loss": 1.0 / step, "lr": 0.01 * step})
    logger.close()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional: pip install wandb)")
def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_three_steps(tmp_path, "wandb")
    run_id = trackers.saved_run_id(tmp_path, "wandb")
    resume_two_steps(tmp_path, "wandb")
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one W&B run id, synced as one run
    history = wandb_history(next(runs[1].glob("*.wandb")))
    assert {step: history[step]["train/loss"] for step in (4, 5)} == {4: 0.25, 5: 0.2}


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (optional: pip install mlflow)")
def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_three_steps(tmp_path, "mlflow")
    resume_two_steps(tmp_path, "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlflow").absolute().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("megaspec").experiment_id])
    assert run.info.run_id == trackers.saved_run_id(tmp_path, "mlflow") and run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(1 / s)) for s in (1, 2, 3, 4, 5)]
