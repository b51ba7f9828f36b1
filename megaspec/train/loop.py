"""The training job: load the base under ZeRO-3, plan adapters collectively, train, eval, log, checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megaspec.calibrate import calibrate_adapters, calibrating
from megaspec.config import flat_dict
from megaspec.distributed.comm import (
    all_gather_object,
    barrier,
    device,
    mean_over_ranks,
    rank,
    sum_over_ranks,
    world_size,
)
from megaspec.distributed.group import init_distributed
from megaspec.gguf import resolve_model, run_dtype
from megaspec.model import AdapterSummary, adapters_of, apply_adapters, load_plans, save_adapter
from megaspec.quant import (
    bnb_config,
    check_quantization,
    prepare_quantized,
    provide_zero_quantizer,
    quantize_frozen_partitions,
    zero_weight_quantization,
)
from megaspec.quant_load import load_quantized_zero3, streams
from megaspec.train.activations import configure_activations
from megaspec.train.checkpoint import (
    CHECKPOINTS,
    config_hash,
    load_checkpoint,
    positions_digest,
    read_latest,
    read_trainer_state,
    resume_checkpoint,
    save_checkpoint,
)
from megaspec.train.config import TrainConfig, resume_keys, run_config_yaml, run_record
from megaspec.train.data import IGNORE, DataConfig, batch_iterator, batch_tokens, collate, load_tokenizer
from megaspec.train.data_cache import node_datasets, run_data_config
from megaspec.train.dsconfig import ConfigError, read_ds_config, resolve_ds_config, zero_stage
from megaspec.train.embedded import embedded_base
from megaspec.train.errors import write_failed
from megaspec.train.global_batch import fit_global_batch
from megaspec.train.guard import NonFiniteGuard, StopSignal, TrainingDiverged, coefficients_finite
from megaspec.train.heartbeat import Heartbeat
from megaspec.train.monitor import RunLogger, gathered_adapter_tensors, progress_bar
from megaspec.train.report import write_report_or_warn

logger = logging.getLogger("megaspec")


def resolve_output_dir(cfg: TrainConfig) -> Path:
    """The run folder, named by rank 0's clock when not given so every rank agrees."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = all_gather_object(time.strftime("%Y%m%d-%H%M%S"))[0]
    return Path("runs") / f"{stamp}-{cfg.adapter.method}"


def build_model(model: str, ds_config: dict[str, Any], quantize: str = "none", quant_load: str | None = None) -> torch.nn.Module:
    """The frozen base, loaded partitioned under ZeRO-3 (HfDeepSpeedConfig makes HF use zero.Init).

    A bitsandbytes base under ZeRO-3 from a local safetensors folder is quantized on load, each rank
    keeping its shard (megaspec.quant_load); otherwise (or with quant_load / $MEGASPEC_QUANT_LOAD
    "whole") it is loaded whole on every rank (transformers skips zero.Init for it) and partitioned
    by deepspeed.initialize. With DeepSpeed's qwZ the frozen shards are stored in int8 before
    planning, so the adapters are planned on the weights they train against (megaspec.quant).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    keep_alive = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None  # noqa: F841
    check_quantization(ds_config, quantize)
    qwz = zero_weight_quantization(ds_config) if zero_stage(ds_config) == 3 else None
    if qwz and provide_zero_quantizer() == "torch" and rank() == 0:
        print(f"{qwz}: no CUDA, so DeepSpeed's int8 weight quantizer runs in torch (megaspec.quant)", flush=True)
    quantization = bnb_config(quantize, dtype)
    if streams(model, ds_config, quantize, quant_load):
        base = load_quantized_zero3(model, ds_config, quantize, dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, quantization_config=quantization)
    if quantization is not None:
        prepare_quantized(base)
    if qwz == "zero_quantized_nontrainable_weights":
        base.requires_grad_(False)
        count = quantize_frozen_partitions(base)
        if rank() == 0:
            print(f"{qwz}: {count} frozen weight shards stored in int8 (DeepSpeed keeps weights under 500k "
                  "elements in the run's dtype)", flush=True)
    return base


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine: Any, eval_set: Any, micro_batch: int, max_batches: int) -> dict[str, float]:
    """Token-weighted eval loss and perplexity; every rank runs the same number of forwards (ZeRO-3)."""
    engine.eval()
    n, world, r = len(eval_set), world_size(), rank()
    steps = min(max_batches, math.ceil(n / (micro_batch * world)))
    loss_sum = tokens = 0.0
    for s in range(steps):
        idx = [s * micro_batch * world + r * micro_batch + i for i in range(micro_batch)]
        real = [i for i in idx if i < n]
        items = [eval_set[i] for i in (real or [0])]
        batch = _to_device(collate(items), device())
        labels = batch.pop("labels")[:, 1:]
        logits = engine(**batch).logits.float()  # position_ids too, with isolated packing
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum")
        if real:
            loss_sum += float(losses)
            tokens += float((labels != IGNORE).sum())
    loss_sum, tokens = sum_over_ranks([loss_sum, tokens])
    engine.train()
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


CALIBRATION_SEED_OFFSET = 1_000_000  # S2FT's estimate draws its own batches: the training order is unchanged


def calibrate_or_restore(engine: Any, cfg: TrainConfig, ckpt: Path | None, train_set: Any, micro: int, accum: int) -> dict[str, Any]:
    """Plan the data-planned adapters (S2FT) through the engine, or restore the resumed checkpoint's plan.

    The estimate takes s2ft_estimate_steps optimizer steps' worth of micro-batches (accum per rank
    per step, so 1 and N ranks see the same global batches) from a stream of their own. A resumed
    run never calibrates again, whatever its number of ranks: its plan is read from the checkpoint's
    adapter/ folder, because load_checkpoint checks the plan digest before it sets the training state.
    """
    if ckpt is not None:
        load_plans(engine.module, ckpt / "adapter")
        info: dict[str, Any] = {"calibration": {"restored_from": str(ckpt)}}
        what = f"restored from {ckpt / 'adapter'}"
    else:
        stream = batch_iterator(train_set, micro, cfg.seed + CALIBRATION_SEED_OFFSET, rank(), world_size())
        batches = [_to_device(next(stream), device()) for _ in range(cfg.adapter.s2ft_estimate_steps * accum)]
        info = calibrate_adapters(engine, batches, group_bytes=cfg.s2ft_estimate_group_mb * 2**20)
        calibration = info["calibration"]
        what = f"calibrated on {calibration['batches']} micro-batches per rank in {calibration['groups']} layer group(s)"
    info["digest"] = positions_digest(engine.module)
    if rank() == 0:
        print(f"{cfg.adapter.method} plan {what} (digest {info['digest'][:12]})", flush=True)
    return info


def megaspec_adapters(model: torch.nn.Module, cfg: TrainConfig) -> AdapterSummary:
    """The run's spectral adapters on the partitioned base; S2FT's data plan is made after deepspeed.initialize."""
    return apply_adapters(model, cfg.adapter, defer_calibration=True)


@dataclass(frozen=True)
class Trainables:
    """How a run puts its trainable layers into the loaded base (freezing the rest) and writes them (collective).

    megaspec's adapters by default; `bench quality --real` trains peft's through this same loop.
    """

    apply: Callable[[torch.nn.Module, TrainConfig], AdapterSummary] = megaspec_adapters
    save: Callable[[torch.nn.Module, Path], Any] = save_adapter


def train(cfg: TrainConfig, heartbeat: Heartbeat | None = None, trainables: Trainables = Trainables()) -> dict[str, Any]:
    """Run the job; returns the final metrics (on every rank), with "stopped": True when a signal or halt_at_step ended it early."""
    raw_ds = read_ds_config(cfg.ds_config)
    init_distributed()
    beat = heartbeat or Heartbeat.from_env()
    try:
        return _run(cfg, raw_ds, beat, trainables)
    finally:
        beat.stop()


@dataclass
class Run:
    """What setup builds and the step functions share."""

    cfg: TrainConfig
    engine: Any
    model: torch.nn.Module
    out: Path
    summary: AdapterSummary
    train_set: Any
    eval_set: Any
    micro: int  # micro-batch per rank
    accum: int  # micro-batches per optimizer step
    expected: dict[str, Any]  # what a checkpoint of this run records and a resume must find
    trainable: list[torch.nn.Parameter]
    guard: NonFiniteGuard
    start_step: int = 0
    resumed_loss: float | None = None  # the loss of the step the run resumed at (a resume with no step left reports it)


def _run(cfg: TrainConfig, raw_ds: dict[str, Any], beat: Heartbeat, trainables: Trainables) -> dict[str, Any]:
    """train() after the process group and the heartbeat exist: setup, then train_step and end_of_step per step."""
    run = setup(cfg, raw_ds, beat, trainables)
    run_log = RunLogger(run.out, resume_step=run.start_step if cfg.resume else None, report_to=cfg.report_to, config=flat_dict(cfg))
    if not cfg.resume:
        run_log.log_allocation(run.model)  # the plan's budget split, at step 0
    stop = StopSignal()
    batches = batch_iterator(run.train_set, run.micro, cfg.seed, rank(), world_size(), start_step=run.start_step * run.accum)
    bar = progress_bar(cfg.max_steps, initial=run.start_step)
    # a run stopped after its last checkpoint but before its final files resumes with no step left:
    # its final metrics are the checkpoint's
    metrics: dict[str, Any] = {} if run.resumed_loss is None else {"loss": run.resumed_loss}
    step = run.start_step
    run.engine.train()
    try:
        while step < cfg.max_steps:
            step += 1
            beat.phase(f"step {step} (forward, backward, optimizer)")
            metrics = train_step(run, batches, step)
            end_of_step(run, step, metrics, beat, run_log)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if run.guard.diverged():
                raise TrainingDiverged(run.guard.message(step))
            stopping = stop.agreed() or step == cfg.halt_at_step
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                beat.phase(f"checkpoint of step {step}")
                extra = {**run.expected, "data_step": step * run.accum, "skipped_steps": run.guard.skipped,
                         "loss": metrics["loss"], "data_seed": cfg.seed}
                save_checkpoint(run.engine, run.model, run.out, step, extra, keep=cfg.keep_checkpoints, save_weights=trainables.save)
            if stopping:
                bar.close()
                if rank() == 0:
                    print(f"stopping at step {step} ({stop.reason()}): checkpoint written; continue with --resume", flush=True)
                return {**metrics, "step": step, "output_dir": str(run.out), "trainable": run.summary.trainable, "stopped": True}
    finally:  # the bar ends its line before any error line; logs are flushed whatever ends the loop
        bar.close()
        run_log.close()
    beat.phase("writing the final adapter")
    final = {**metrics, "step": step, "output_dir": str(run.out), "trainable": run.summary.trainable}
    _write_final(run.model, run.out, final, trainables.save)
    if rank() == 0 and cfg.report == "html":
        write_report_or_warn(run.out)  # report.html; never ends a run
    return final


def setup(cfg: TrainConfig, raw_ds: dict[str, Any], beat: Heartbeat, trainables: Trainables = Trainables()) -> Run:
    """Load the tokenizer, the base (partitioned) and the data, plan the adapters, start the engine, restore a checkpoint."""
    import deepspeed

    beat.phase("setup (loading the tokenizer, model and data, planning the adapters)")
    model_path = resolve_model(cfg.model, run_dtype(raw_ds)) if cfg.model else str(embedded_base())  # a .gguf: its HF copy
    tokenizer = load_tokenizer(cfg.tokenizer or _model_tokenizer(model_path))
    out = resolve_output_dir(cfg)
    _check_output_dir(out, cfg)
    ckpt = resume_checkpoint(out) if cfg.resume else None  # refuses, in one line, when there is nothing usable
    warmup = max(1, int(cfg.warmup_ratio * cfg.max_steps))
    ds_config = resolve_ds_config(raw_ds, lr=cfg.learning_rate(), max_steps=cfg.max_steps, warmup_steps=warmup,
                                  hidden_size=_hidden_size(model_path))
    saved = read_trainer_state(ckpt) if ckpt is not None else None
    if saved is not None and saved.get("format", 1) >= 2:  # any number of ranks: the checkpoint's global batch
        ds_config, note = fit_global_batch(ds_config, saved, world_size())
        if note:
            _say(f"resuming {ckpt.name} on {world_size()} rank(s): {note}")
    model = build_model(model_path, ds_config, cfg.quantize)
    model.config.use_cache = False
    _say(configure_activations(model, cfg.gradient_checkpointing, cfg.attn_implementation))
    summary = trainables.apply(model, cfg)  # S2FT: calibrated below
    _say(summary)

    # the embedded default fine-tunes on the instruction task, a shift from the pretraining corpus
    data_cfg = data_config(cfg)
    nonce = all_gather_object(uuid.uuid4().hex)[0]  # tags a failed build's error file with this run
    beat.phase("setup (tokenizing the data once per node, megaspec.train.data_cache)")
    train_set, eval_set = node_datasets(data_cfg, tokenizer, cfg.data_cache, nonce, log=_say)
    beat.phase("setup (starting the DeepSpeed engine, restoring a checkpoint)")

    trainable = [p for p in model.parameters() if p.requires_grad]
    _quiet_scheduler_start()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    _create_output_dir(out, cfg)
    run = Run(cfg, engine, model, out, summary, train_set, eval_set, engine.train_micro_batch_size_per_gpu(),
              engine.gradient_accumulation_steps(), {"config_hash": config_hash(resume_keys(cfg, former=True)), "base_model": model_path},
              trainable, NonFiniteGuard(cfg.max_skipped_steps))
    if calibrating(adapters_of(model)):
        summary.plan.update(calibrate_or_restore(engine, cfg, ckpt, train_set, run.micro, run.accum))
    if ckpt is not None:
        state = load_checkpoint(engine, ckpt, expected=run.expected)
        run.start_step, run.guard.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
        run.resumed_loss = state.get("loss")
        _say(f"resumed from {ckpt} at step {run.start_step}")
    align_lr_schedule(engine, run.start_step)
    continuing = ckpt is not None and run.start_step < cfg.max_steps
    _write_run_files(out, cfg, ds_config, summary, continuing=continuing, base=model_path)
    return run


def _scheduler_start_warning(record: logging.LogRecord) -> bool:
    return "learning rate from scheduler before it has started" not in record.getMessage()


def _quiet_scheduler_start() -> None:
    """Drop DeepSpeed's "get learning rate before it has started" warning: its WarmupLR asks itself in __init__."""
    from deepspeed.utils import logger

    if _scheduler_start_warning not in logger.filters:
        logger.addFilter(_scheduler_start_warning)


def train_step(run: Run, batches: Iterator[dict[str, torch.Tensor]], step: int) -> dict[str, float]:
    """Optimizer step `step` (1-based): its micro-batches, the update, and its metrics averaged over ranks."""
    t0 = time.perf_counter()
    lr_used = run.engine.get_lr()[0]  # the LR this step's optimizer update applies (the scheduler moves after it)
    losses, tokens = accumulate(run.engine, batches, run.guard, run.accum)
    norm = run.engine.get_global_grad_norm() if losses else None  # None: this config does not compute it
    grad_norm = float("nan") if norm is None else float(norm)
    run.guard.end_step(skipped=not losses, grad_norm=None if norm is None else grad_norm)
    if losses and not coefficients_finite(run.trainable):
        raise TrainingDiverged(
            f"adapter parameters became non-finite in the optimizer update of step {step} (lr {lr_used:.3g}); "
            f"{_kept(run.out)}: lower --lr (or check the data), then --resume"
        )
    elapsed = time.perf_counter() - t0
    return {
        "loss": mean_over_ranks(sum(losses) / len(losses)) if losses else float("nan"),
        "lr": lr_used,
        "grad_norm": grad_norm,
        "skipped_steps": run.guard.skipped,
        "tokens_per_s": sum_over_ranks([tokens])[0] / elapsed,
        "step_time": elapsed,
    }


def accumulate(engine: Any, batches: Iterator[dict[str, torch.Tensor]], guard: NonFiniteGuard, accum: int) -> tuple[list[float], float]:
    """Forward and backward of one step's `accum` micro-batches, skipping those whose loss is not finite on some rank.

    Returns the finite losses and this rank's trained tokens. DeepSpeed finds the accumulation
    boundary by counting engine.step() calls, so a skipped micro-batch owes one: it is made once a
    finite micro-batch follows (before that one's backward), and the owed calls are settled at the
    end. A step with no finite micro-batch calls DeepSpeed not at all: weights, optimizer state and
    LR schedule stay as they were.
    """
    on = device()
    losses, tokens, owed = [], 0.0, 0
    for _ in range(accum):
        batch = _to_device(next(batches), on)
        loss = engine(**batch).loss
        if not guard.finite(loss):
            owed += 1
            continue
        owed = _catch_up(engine, owed)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        tokens += batch_tokens(batch)
    if losses:
        _catch_up(engine, owed)
    return losses, tokens


def _catch_up(engine: Any, owed: int) -> int:
    """Make the engine.step() calls of skipped micro-batches, keeping DeepSpeed's accumulation boundary in place."""
    for _ in range(owed):
        engine.step()
    return 0


def end_of_step(run: Run, step: int, metrics: dict[str, Any], beat: Heartbeat, run_log: RunLogger) -> None:
    """Evaluate and log when due (eval adds eval_loss and eval_ppl to `metrics`)."""
    cfg, last = run.cfg, step == run.cfg.max_steps
    if cfg.eval_every and (step % cfg.eval_every == 0 or last) and len(run.eval_set):
        beat.phase(f"eval at step {step}")
        metrics.update(evaluate(run.engine, run.eval_set, run.micro, cfg.eval_batches))
    if step % cfg.log_every == 0 or last or "eval_loss" in metrics:
        beat.phase(f"logging step {step}")
        tensors = gathered_adapter_tensors(run.model)
        run_log.log_scalars(step, metrics)
        run_log.log_spectral(step, run.model, tensors)
        if step % cfg.image_every == 0 or last or step == run.start_step + 1:
            run_log.log_spectral_images(step, run.model, tensors)


def _say(line: Any) -> None:
    """Print on rank 0 (the line every rank would print)."""
    if rank() == 0:
        print(line, flush=True)


def align_lr_schedule(engine: Any, step: int) -> None:
    """Set the LR of optimizer step `step + 1` to the scheduler's iteration `step + 1`.

    DeepSpeed's schedulers start at iteration -1 (min LR) and step after each update, so left
    alone the first two updates both run at warmup_min_lr (0 by default: two wasted steps), and
    get_lr() after a step is the next step's LR (issue 15). Here update k runs at iteration k:
    a linear warmup over W steps gives k/W of the peak at update k, reaching it at update W. After
    a resume the checkpoint's iteration is set again, so the optimizer's LR follows it exactly.
    """
    scheduler = engine.lr_scheduler
    if scheduler is not None and hasattr(scheduler, "last_batch_iteration"):
        scheduler.step(step + 1)


def _kept(out: Path) -> str:
    """'the last good checkpoint X is kept' or that none was written, for the divergence line."""
    latest = read_latest(out / CHECKPOINTS) if rank() == 0 else None
    return f"the last good checkpoint {out / CHECKPOINTS / latest} is kept" if latest else "no checkpoint was written"


def _write_final(model: torch.nn.Module, out: Path, final: dict[str, Any],
                 save_weights: Callable[[torch.nn.Module, Path], Any] = save_adapter) -> None:
    """adapter/ and final_metrics.json of a finished run, each put in place whole (temp name, then rename)."""
    import shutil

    tmp = out / ".tmp-adapter"

    def write() -> None:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        save_weights(model, tmp)  # collective gather, rank 0 writes
        if rank() != 0:
            return
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(tmp, out / "adapter")
        metrics_tmp = out / ".final_metrics.json.tmp"
        metrics_tmp.write_text(json.dumps(final, indent=1))
        os.replace(metrics_tmp, out / "final_metrics.json")

    try:
        write()
    except OSError as exc:
        raise write_failed(exc, "the final adapter", out, read_latest(out / CHECKPOINTS)) from exc


def data_config(cfg: TrainConfig) -> DataConfig:
    """The run's DataConfig (megaspec.train.data_cache.run_data_config with the run's packing and chat template)."""
    return run_data_config(cfg.dataset, cfg.seq_len, cfg.seed, cfg.packing, cfg.chat_template, cfg.eval_dataset,
                           cfg.eval_fraction, cfg.split_seed)


def run_tokenizer(cfg: TrainConfig) -> Any:
    """The run's tokenizer: --tokenizer, else the model's own, else the embedded one."""
    model_path = resolve_model(cfg.model, run_dtype(read_ds_config(cfg.ds_config))) if cfg.model else str(embedded_base())
    return load_tokenizer(cfg.tokenizer or _model_tokenizer(model_path))


def _model_tokenizer(model: str | None) -> str | None:
    """A local model folder carries its tokenizer; the embedded model uses the embedded tokenizer."""
    if model is None:
        return None
    path = Path(model)
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"--model {model} has no tokenizer files; pass --tokenizer PATH")
    return model


def _hidden_size(model: str) -> int:
    """The model's hidden size (sizes DeepSpeed's buckets), or a clear error for a bad --model."""
    from transformers import AutoConfig

    if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ConfigError(f"--model {model} does not exist; pass a local HF model folder or a hub id")
    return int(getattr(AutoConfig.from_pretrained(model), "hidden_size", 4096))


# What megaspec writes into a run folder: --overwrite replaces a folder holding these and nothing else.
RUN_FILES = frozenset({
    "adapter", "adapter_summary.json", CHECKPOINTS, "config.yaml", "ds_config.json", "final_metrics.json", "metrics.jsonl",
    "tensorboard", "train_config.json", ".tmp-adapter", ".final_metrics.json.tmp",
    "figures", "report.html", ".report.html.tmp", "wandb", "mlflow",  # monitor figures, run report, trackers
})
RUN_MARKERS = frozenset({"train_config.json", CHECKPOINTS, "metrics.jsonl"})


def run_folder_problem(out: Path) -> str | None:
    """Why `out` is not a megaspec run folder that --overwrite may delete, or None when it is one."""
    entries = sorted(p.name for p in out.iterdir())
    foreign = [name for name in entries if name not in RUN_FILES]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        return f"it holds files megaspec did not write ({shown})"
    if not RUN_MARKERS & set(entries):
        return "it is not a megaspec run folder (no train_config.json, checkpoints/ or metrics.jsonl)"
    return None


def writable_problem(out: Path) -> str | None:
    """Why nothing can be written at `out` (read-only, no permission, a file in the way), or None; leaves nothing behind."""
    import tempfile

    base = Path(out).absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return f"--output_dir {out}: {base} is a file, not a folder; choose another --output_dir"
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".megaspec-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"--output_dir {out} cannot be written ({exc.strerror} in {base}); choose a folder you can write to"
    return None


def _check_output_dir(out: Path, cfg: TrainConfig) -> None:
    """Refuse, before anything is loaded, a run folder this run must not write to (rank 0 decides).

    A folder holding files needs --resume (continue) or --overwrite (replace), and --overwrite only
    ever replaces a megaspec run folder (issue 15: it used to delete whatever the folder held).
    """
    problem = None
    if rank() == 0:
        problem = writable_problem(out)
        if problem is None and out.is_dir() and any(out.iterdir()) and not cfg.resume:
            if not cfg.overwrite:
                problem = f"--output_dir {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            elif (reason := run_folder_problem(out)) is not None:
                problem = (f"--overwrite refuses to delete {out}: {reason}; choose another --output_dir, or move "
                           "those files away first")
    problem = all_gather_object(problem)[0]
    if problem:
        raise ConfigError(problem)


def _create_output_dir(out: Path, cfg: TrainConfig) -> None:
    """Create (or, with --overwrite, recreate) the run folder once setup has succeeded."""
    if cfg.overwrite and not cfg.resume and rank() == 0 and out.exists() and run_folder_problem(out) is None:
        import shutil

        shutil.rmtree(out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()


def _write_run_files(out: Path, cfg: TrainConfig, ds_config: dict[str, Any], summary: Any, continuing: bool, base: str = "") -> None:
    """The run's config files (rank 0); a resumed run that goes on drops the finished-run files of its earlier end.

    train_config.json (flat, what export, generate, report and --resume read) also records `base_folder`,
    the HF folder the base was loaded from (for a .gguf --model its converted copy, megaspec.gguf);
    config.yaml holds the same options as a --config file.
    """
    if rank() != 0:
        return
    if continuing:
        import shutil

        # A run resumed past its earlier end (a larger --max_steps) is unfinished again: its old
        # adapter/ and final_metrics.json would say otherwise (issue 15); the checkpoints hold that state.
        (out / "final_metrics.json").unlink(missing_ok=True)
        shutil.rmtree(out / "adapter", ignore_errors=True)
    (out / "train_config.json").write_text(json.dumps(run_record(cfg, base or None), indent=1))
    (out / "config.yaml").write_text(run_config_yaml(cfg, str(out)))  # --config FILE trains this run again
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    (out / "adapter_summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1, default=str))
