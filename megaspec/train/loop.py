"""The training job: load the base under ZeRO-3, plan adapters collectively, train, eval, log, checkpoint."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaspec.calibrate import calibrate_adapters, calibrating
from megaspec.config import DEFAULT_TARGETS, AdapterConfig
from megaspec.dist.comm import all_gather_object, rank, world_size
from megaspec.model import adapters_of, apply_adapters, load_plans, save_adapter
from megaspec.quant import (
    bnb_config,
    check_quantization,
    prepare_quantized,
    provide_zero_quantizer,
    quantize_frozen_partitions,
    zero_weight_quantization,
)
from megaspec.quant_load import load_quantized_zero3, streams
from megaspec.train.checkpoint import (
    config_hash,
    latest_checkpoint,
    load_checkpoint,
    positions_digest,
    save_checkpoint,
)
from megaspec.train.data import DataConfig, batch_iterator, build_datasets, load_tokenizer
from megaspec.train.dsconfig import ConfigError, read_ds_config, resolve_ds_config, zero_stage
from megaspec.train.embedded import embedded_base
from megaspec.train.monitor import RunLogger, gathered_adapter_tensors, progress_bar

logger = logging.getLogger("megaspec")

DEFAULT_LR = {"ssh": 2e-2, "fourierft": 2e-2, "s2ft": 2e-2, "lora": 1e-3}


@dataclass
class TrainConfig:
    """Everything a run needs besides the DeepSpeed config (micro-batch, precision, ZeRO stage)."""

    ds_config: str = "ds_configs/zero3.json"
    model: str | None = None  # None: the embedded tiny LLaMA (megaspec.train.embedded)
    tokenizer: str | None = None  # None: the model's own, or the embedded tokenizer
    dataset: str | None = None  # None: the embedded corpus
    method: str = "ssh"
    n_coeffs: int = 750
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    energy_ratio: float = 0.5
    selection: str = "global"
    rank: int = 8
    alpha: float = 16.0
    scale: float | None = None
    init: str = "zeros"
    s2ft_estimate_steps: int = 4  # s2ft: optimizer steps' worth of batches in the gradient estimate
    max_steps: int = 100
    seq_len: int = 128
    lr: float | None = None  # None: the method's default (DEFAULT_LR)
    warmup_ratio: float = 0.06
    seed: int = 42
    output_dir: str | None = None  # None: runs/<time>-<method>
    resume: bool = False
    overwrite: bool = False
    eval_every: int = 50
    eval_batches: int = 20
    save_every: int = 50
    log_every: int = 1
    image_every: int = 50
    keep_checkpoints: int = 2
    max_skipped_steps: int = 10  # consecutive steps with a non-finite loss that are skipped; one more stops the run
    halt_at_step: int | None = None  # checkpoint and exit early, as if preempted (chunked jobs, tests)
    quantize: str = "none"  # frozen base in bitsandbytes nf4 | fp4 | int8 (megaspec.quant)

    def adapter_config(self) -> AdapterConfig:
        """The AdapterConfig this run applies."""
        return AdapterConfig(
            method=self.method, target_modules=list(self.target_modules), n_coeffs=self.n_coeffs,
            energy_ratio=self.energy_ratio, selection=self.selection, scale=self.scale, init=self.init,
            rank=self.rank, alpha=self.alpha, seed=self.seed, s2ft_estimate_steps=self.s2ft_estimate_steps,
        )

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.method, 1e-3)


def init_distributed() -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPU); a no-op when already joined."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=dist_timeout())


def resolve_output_dir(cfg: TrainConfig) -> Path:
    """The run folder, named by rank 0's clock when not given so every rank agrees."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = all_gather_object(time.strftime("%Y%m%d-%H%M%S"))[0]
    return Path("runs") / f"{stamp}-{cfg.method}"


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


def _mean_over_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def _sum_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    if world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


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
        batch = _to_device({k: torch.stack([it[k] for it in items]) for k in items[0]}, _device())
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        if real:
            loss_sum += float(losses)
            tokens += float((labels != -100).sum())
    loss_sum, tokens = _sum_over_ranks([loss_sum, tokens])
    engine.train()
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def dist_timeout() -> datetime.timedelta:
    """How long a collective waits for a peer before the job fails ($MEGASPEC_DIST_TIMEOUT_S, default 600 s)."""
    text = os.environ.get("MEGASPEC_DIST_TIMEOUT_S", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"MEGASPEC_DIST_TIMEOUT_S={text!r} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for more than --max_skipped_steps steps in a row; existing checkpoints are kept."""


class NonFiniteGuard:
    """Skips micro-batches whose loss is NaN/inf on any rank (no backward, no update); stops a run that diverged.

    The flag is all-reduced so every rank skips the same micro-batches (ZeRO-3 collectives stay in
    lockstep). A step with no finite micro-batch is skipped whole: DeepSpeed is not called, so the
    weights, optimizer state and LR schedule stay as they were. With gradient accumulation, a step
    with some finite micro-batches updates from those alone. $MEGASPEC_TEST_NAN_STEPS=4,5 makes
    rank 0 see a NaN loss in every micro-batch of steps 4 and 5 (tests of this logic).
    """

    def __init__(self, limit: int, skipped: int = 0) -> None:
        self.limit = limit
        self.skipped = skipped  # steps skipped in the whole run (saved with checkpoints)
        self.streak = 0  # skipped steps in a row, up to the current one
        hook = os.environ.get("MEGASPEC_TEST_NAN_STEPS", "")
        self.test_steps = {int(s) for s in hook.split(",") if s.strip()}

    def finite(self, loss: torch.Tensor, step: int) -> bool:
        """Whether this micro-batch's loss is finite on every rank (step: the 1-based step it belongs to)."""
        ok = bool(torch.isfinite(loss.detach()).all()) and not (step in self.test_steps and rank() == 0)
        return _sum_over_ranks([0.0 if ok else 1.0])[0] == 0

    def end_step(self, skipped: bool) -> None:
        """Count a finished step, skipped (no finite micro-batch) or not."""
        self.streak = self.streak + 1 if skipped else 0
        self.skipped += int(skipped)

    def diverged(self) -> bool:
        """More than `limit` steps in a row were skipped."""
        return self.streak > self.limit

    def message(self, step: int) -> str:
        """The one line that stops the run."""
        return (
            f"loss is not finite at step {step}: {self.streak} steps in a row (from step {step - self.streak + 1}) "
            f"exceed --max_skipped_steps {self.limit}; the run's checkpoints keep the last good state: "
            "lower --lr or check the data, then --resume"
        )


def _catch_up(engine: Any, owed: int) -> int:
    """Make the engine.step() calls of skipped micro-batches, keeping DeepSpeed's accumulation boundary in place."""
    for _ in range(owed):
        engine.step()
    return 0


class StopSignal:
    """SIGTERM/SIGUSR1 (SLURM preemption) set a flag; the loop checkpoints and exits at the step's end."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def reason(self) -> str:
        """Why the run stops, for the log line."""
        return f"signal {signal.Signals(self.received).name}" if self.received else "halt_at_step or a signal on another rank"

    def agreed(self) -> bool:
        """True on every rank once any rank got the signal (ranks must stop at the same step)."""
        return _sum_over_ranks([1.0 if self.received is not None else 0.0])[0] > 0


CALIBRATION_SEED_OFFSET = 1_000_000  # S2FT's estimate draws its own batches: the training order is unchanged


def calibrate_or_restore(engine: Any, cfg: TrainConfig, out: Path, train_set: Any, micro: int, accum: int) -> dict[str, Any]:
    """Plan the data-planned adapters (S2FT) through the engine, or restore the resumed checkpoint's plan.

    The estimate takes s2ft_estimate_steps optimizer steps' worth of micro-batches (accum per rank
    per step, so 1 and N ranks see the same global batches) from a stream of their own. A resumed
    run never calibrates again: its plan is read from the checkpoint's adapter/ folder, because
    load_checkpoint checks the plan digest before the engine state (which also holds the module's
    buffers) is loaded.
    """
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        load_plans(engine.module, ckpt / "adapter")
        info: dict[str, Any] = {"calibration": {"restored_from": str(ckpt)}}
        what = f"restored from {ckpt / 'adapter'}"
    else:
        stream = batch_iterator(train_set, micro, cfg.seed + CALIBRATION_SEED_OFFSET, rank(), world_size())
        info = calibrate_adapters(engine, (_to_device(next(stream), _device()) for _ in range(cfg.s2ft_estimate_steps * accum)))
        what = f"calibrated on {info['calibration']['batches']} micro-batches per rank"
    info["digest"] = positions_digest(engine.module)
    if rank() == 0:
        print(f"{cfg.method} plan {what} (digest {info['digest'][:12]})", flush=True)
    return info


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job; returns the final metrics (on every rank)."""
    import deepspeed

    raw_ds = read_ds_config(cfg.ds_config)
    init_distributed()
    model_path = cfg.model or str(embedded_base())
    tokenizer = load_tokenizer(cfg.tokenizer or _model_tokenizer(model_path))
    out = resolve_output_dir(cfg)
    _check_output_dir(out, cfg)
    lr = cfg.learning_rate()
    warmup = max(1, int(cfg.warmup_ratio * cfg.max_steps))

    hidden = _hidden_size(model_path)
    ds_config = resolve_ds_config(raw_ds, lr=lr, max_steps=cfg.max_steps, warmup_steps=warmup, hidden_size=hidden)
    model = build_model(model_path, ds_config, cfg.quantize)
    model.config.use_cache = False
    summary = apply_adapters(model, cfg.adapter_config(), defer_calibration=True)  # S2FT: calibrated below
    if rank() == 0:
        print(summary, flush=True)

    # the embedded default fine-tunes on the instruction task, a shift from the pretraining corpus
    data_cfg = DataConfig(dataset=cfg.dataset, seq_len=cfg.seq_len, seed=cfg.seed, format="auto" if cfg.dataset else "instruction")
    train_set, eval_set = build_datasets(data_cfg, tokenizer)

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    micro = engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    _create_output_dir(out, cfg)
    expected = {"config_hash": config_hash(_resume_keys(cfg)), "base_model": model_path}
    if calibrating(adapters_of(model)):
        summary.plan.update(calibrate_or_restore(engine, cfg, out, train_set, micro, accum))

    start_step = 0
    guard = NonFiniteGuard(cfg.max_skipped_steps)
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            state = load_checkpoint(engine, ckpt, expected=expected)
            start_step = int(state["step"])
            guard.skipped = int(state.get("skipped_steps", 0))
            if rank() == 0:
                print(f"resumed from {ckpt} at step {start_step}", flush=True)
    _write_run_files(out, cfg, ds_config, summary)

    run_log = RunLogger(out, resume_step=start_step if cfg.resume else None)
    stop = StopSignal()
    batches = batch_iterator(train_set, micro, cfg.seed, rank(), world_size(), start_step=start_step * accum)
    bar = progress_bar(cfg.max_steps, initial=start_step)
    device = _device()
    metrics: dict[str, Any] = {}
    step = start_step
    engine.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        losses, tokens = [], 0.0
        owed = 0  # engine.step() calls of skipped micro-batches, made once a finite one follows
        for _ in range(accum):
            batch = _to_device(next(batches), device)
            loss = engine(**batch).loss
            if not guard.finite(loss, step + 1):
                owed += 1
                continue
            owed = _catch_up(engine, owed)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            tokens += float(batch["attention_mask"].sum())
        if losses:
            _catch_up(engine, owed)
        step += 1
        guard.end_step(skipped=not losses)
        elapsed = time.perf_counter() - t0
        loss_value = _mean_over_ranks(sum(losses) / len(losses)) if losses else float("nan")
        tokens = _sum_over_ranks([tokens])[0]
        metrics = {
            "loss": loss_value,
            "lr": engine.get_lr()[0],
            "grad_norm": _grad_norm(engine) if losses else float("nan"),
            "skipped_steps": guard.skipped,
            "tokens_per_s": tokens / elapsed,
            "step_time": elapsed,
        }
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps) and len(eval_set):
            metrics.update(evaluate(engine, eval_set, micro, cfg.eval_batches))
        if step % cfg.log_every == 0 or step == cfg.max_steps or "eval_loss" in metrics:
            tensors = gathered_adapter_tensors(model)
            run_log.log_scalars(step, metrics)
            run_log.log_spectral(step, model, tensors)
            if step % cfg.image_every == 0 or step == cfg.max_steps or step == start_step + 1:
                run_log.log_spectral_images(step, model, tensors)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if guard.diverged():
            bar.close()
            run_log.close()
            raise TrainingDiverged(guard.message(step))
        stopping = stop.agreed() or step == cfg.halt_at_step
        if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
            save_checkpoint(engine, model, out, step, {**expected, "data_step": step * accum, "skipped_steps": guard.skipped}, keep=cfg.keep_checkpoints)
        if stopping:
            if rank() == 0:
                print(f"stopping at step {step} ({stop.reason()}): checkpoint written; continue with --resume", flush=True)
            break
    bar.close()
    save_adapter(model, out / "adapter")
    run_log.close()
    final = {**metrics, "step": step, "output_dir": str(out), "trainable": summary.trainable}
    if rank() == 0:
        (out / "final_metrics.json").write_text(json.dumps(final, indent=1))
    return final


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


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


def _resume_keys(cfg: TrainConfig) -> dict[str, Any]:
    """What must match for --resume to continue a run (not max_steps, not logging cadence)."""
    keep = ("model", "dataset", "method", "n_coeffs", "target_modules", "energy_ratio", "selection", "rank", "alpha", "scale", "init", "seq_len", "seed", "quantize")
    return {k: getattr(cfg, k) for k in keep}


def _check_output_dir(out: Path, cfg: TrainConfig) -> None:
    """Refuse to mix two runs in one folder unless --resume or --overwrite says so (rank 0 decides)."""
    problem = None
    if rank() == 0 and out.exists() and any(out.iterdir()) and not cfg.resume and not cfg.overwrite:
        problem = f"--output_dir {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
    problem = all_gather_object(problem)[0]
    if problem:
        raise ConfigError(problem)


def _create_output_dir(out: Path, cfg: TrainConfig) -> None:
    """Create (or, with --overwrite, recreate) the run folder once setup has succeeded."""
    if cfg.overwrite and not cfg.resume and rank() == 0 and out.exists():
        import shutil

        shutil.rmtree(out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world_size() > 1:
        dist.barrier()


def _write_run_files(out: Path, cfg: TrainConfig, ds_config: dict[str, Any], summary: Any) -> None:
    if rank() != 0:
        return
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    (out / "adapter_summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1, default=str))
