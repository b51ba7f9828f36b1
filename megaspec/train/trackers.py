"""Where a run's scalars, histograms and images go: `--report_to tensorboard,wandb,mlflow`, as in HF's Trainer.

TensorBoard (the default) is a dependency. W&B and MLflow are used when their packages are installed
and skipped with one line when not; neither is a dependency of megaspec.
- W&B: `wandb.init(dir=<run folder>)`; WANDB_MODE=offline (or no login) keeps it on disk, `wandb sync`
  uploads it later; WANDB_PROJECT names the project (default megaspec).
- MLflow: the tracking URI MLFLOW_TRACKING_URI, or a file store in `<run folder>/mlflow` (no server,
  no database; MLFLOW_ALLOW_FILE_STORE=true is set for MLflow 3, which otherwise refuses file stores);
  MLFLOW_EXPERIMENT_NAME names the experiment (default megaspec).

`Trackers` fans each call out with SummaryWriter's signatures (images come as PNG bytes: `add_png`). A TensorBoard failure is raised to
the monitor's best-effort handler as before; a W&B or MLflow failure is reported once and that
tracker is dropped, so it never costs the other trackers (or the run) anything.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megaspec.train.dsconfig import ConfigError

REPORT_TO = ("tensorboard", "wandb", "mlflow")
PACKAGE = {"wandb": "wandb", "mlflow": "mlflow"}


def parse_report_to(value: str | Sequence[str]) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; 'all' -> every tracker; 'none' -> []. ConfigError on an unknown name."""
    names = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if names == ["all"]:
        return list(REPORT_TO)
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"--report_to {','.join(names)}: unknown tracker {unknown[0]!r}; choose from "
                         f"{', '.join(REPORT_TO)} (comma-separated), all or none")
    return list(dict.fromkeys(names))


def available(name: str) -> bool:
    """Whether the tracker's package is installed (TensorBoard always is)."""
    return name == "tensorboard" or importlib.util.find_spec(PACKAGE[name]) is not None


def _warn(line: str) -> None:
    print(f"train: {line}", file=sys.stderr, flush=True)


class _StepBuffer:
    """Collects one step's values and hands them over in one call when the step changes (or on flush)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.values: dict[str, Any] = {}

    def add(self, tag: str, value: Any, step: int) -> None:
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        self.values[tag] = value

    def flush(self) -> None:
        if self.values and self.step is not None:
            self.write(self.step, self.values)
        self.values = {}

    def write(self, step: int, values: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.add(tag, float(value), step)

    def close(self) -> None:
        self.flush()


RUN_ID = "megaspec_run_id"  # in the tracker's folder of the run: the tracker run a --resume continues


def saved_run_id(output_dir: Path, name: str) -> str | None:
    """The id of the W&B or MLflow run this run folder logged to, if one was recorded."""
    path = output_dir / name / RUN_ID
    return path.read_text().strip() or None if path.is_file() else None


def record_run_id(output_dir: Path, name: str, run_id: str) -> None:
    """Keep the tracker run's id in the run folder (written whole: a tmp file renamed)."""
    path = output_dir / name / RUN_ID
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)


class WandbTracker(_StepBuffer):
    """One W&B run per run folder, its files under it; a resumed run continues the same W&B run."""

    def __init__(self, output_dir: Path, config: dict[str, Any], resume: bool = False) -> None:
        super().__init__()
        import wandb

        self.wandb = wandb
        run_id = (saved_run_id(output_dir, "wandb") if resume else None) or secrets.token_hex(4)  # W&B: 8 characters of [a-z0-9]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "megaspec"), name=output_dir.name, id=run_id,
                              resume="allow", dir=str(output_dir), config=config, reinit="finish_previous")
        record_run_id(output_dir, "wandb", run_id)

    def write(self, step: int, values: dict[str, Any]) -> None:
        self.run.log(values, step=step)

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self.add(tag, self.wandb.Histogram(np.asarray(values)), step)

    def add_png(self, tag: str, png: bytes, step: int) -> None:
        self.add(tag, self.wandb.Image(_decode(png)), step)

    def close(self) -> None:
        self.flush()
        self.run.finish()


class MlflowTracker(_StepBuffer):
    """One MLflow run per run folder, through MlflowClient (no global active run): metrics in batches, images as
    artifacts; a resumed run continues the same MLflow run."""

    def __init__(self, output_dir: Path, config: dict[str, Any], resume: bool = False) -> None:
        super().__init__()
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store needs no server and no database; MLflow 3 asks for this opt-in to use one
            uri = (output_dir / "mlflow").absolute().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "megaspec")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        saved = saved_run_id(output_dir, "mlflow") if resume else None
        if saved is not None and self._exists(saved):
            self.run_id = saved
            self.client.update_run(saved, status="RUNNING")
            return  # its params are logged; MLflow refuses to change one (a resume may raise max_steps)
        self.run_id = self.client.create_run(experiment_id, run_name=output_dir.name).info.run_id
        record_run_id(output_dir, "mlflow", self.run_id)
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in config.items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id) is not None
        except Exception:  # deleted, or another tracking server: start a new run
            return False

    def write(self, step: int, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        # MLflow keys allow letters, digits, _ - . space and /
        metrics = [Metric(key, value, stamp, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        """MLflow has no histogram type: nothing is logged."""

    def add_png(self, tag: str, png: bytes, step: int) -> None:
        self.client.log_image(self.run_id, _decode(png), key=tag.replace("/", "."), step=step)

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)


def _decode(png: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def add_png_to_tensorboard(writer: Any, tag: str, png: bytes, step: int) -> None:
    """An image summary holding these PNG bytes as they are (SummaryWriter.add_image would re-encode them as RGB)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = _decode(png).size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class Trackers:
    """SummaryWriter's interface over the chosen trackers; `tensorboard` is the SummaryWriter itself (or None)."""

    def __init__(self, tensorboard: Any | None, others: dict[str, Any]) -> None:
        self.tensorboard = tensorboard
        self.others = others

    @property
    def names(self) -> list[str]:
        return (["tensorboard"] if self.tensorboard is not None else []) + list(self.others)

    def _call(self, method: str, *args: Any, tensorboard: Any = None, **kwargs: Any) -> None:
        """`method` on every tracker; `tensorboard`: what to call instead on the SummaryWriter."""
        for name, tracker in list(self.others.items()):
            try:
                getattr(tracker, method)(*args, **kwargs)
            except Exception as exc:  # W&B/MLflow never cost the run or TensorBoard anything
                del self.others[name]
                _warn(f"warning: {name} {method} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      f"{name} is off for the rest of the run")
        if self.tensorboard is not None:
            (tensorboard or getattr(self.tensorboard, method))(*args, **kwargs)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self._call("add_histogram", tag, values, step)

    def add_png(self, tag: str, png: bytes, step: int) -> None:
        """An image given as PNG bytes (a palette PNG stays one in TensorBoard's event file)."""
        self._call("add_png", tag, png, step, tensorboard=lambda *args: add_png_to_tensorboard(self.tensorboard, *args))

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")


def open_trackers(report_to: str | Sequence[str], output_dir: Path, config: dict[str, Any] | None = None,
                  flush_secs: int = 30, purge_step: int | None = None) -> Trackers:
    """The trackers of `report_to` that can run here; the others are skipped with one line each."""
    names = parse_report_to(report_to)
    tensorboard = None
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter

        tensorboard = SummaryWriter(str(output_dir / "tensorboard"), flush_secs=flush_secs, purge_step=purge_step)
    others: dict[str, Any] = {}
    for name, cls in (("wandb", WandbTracker), ("mlflow", MlflowTracker)):
        if name not in names:
            continue
        if not available(name):
            _warn(f"--report_to {name}: the {PACKAGE[name]} package is not installed, so {name} is skipped "
                  f"(pip install {PACKAGE[name]})")
            continue
        try:
            others[name] = cls(output_dir, dict(config or {}), resume=purge_step is not None)
        except Exception as exc:
            _warn(f"warning: --report_to {name} could not start ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); {name} is skipped")
    return Trackers(tensorboard, others)


def tensorboard_scalars(log_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under `prefix` in a TensorBoard folder, by tag: [(step, value)] in step order (purged steps dropped)."""
    if not log_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(prefix):
            last: dict[int, float] = {}
            for event in acc.Scalars(tag):
                last[int(event.step)] = float(event.value)  # a resumed run's rewrite of a step wins
            out[tag] = sorted(last.items())
    return out
