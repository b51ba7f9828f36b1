"""The training job: load the base under ZeRO-3, plan adapters collectively, train, eval, log, checkpoint."""

from __future__ import annotations

import dataclasses
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

from megaspec.config import DEFAULT_TARGETS, AdapterConfig
from megaspec.dist.comm import all_gather_object, rank, world_size
from megaspec.model import apply_adapters, save_adapter
from megaspec.train.checkpoint import config_hash, latest_checkpoint, load_checkpoint, save_checkpoint
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
    halt_at_step: int | None = None  # checkpoint and exit early, as if preempted (chunked jobs, tests)

    def adapter_config(self) -> AdapterConfig:
        """The AdapterConfig this run applies."""
        return AdapterConfig(
            method=self.method, target_modules=list(self.target_modules), n_coeffs=self.n_coeffs,
            energy_ratio=self.energy_ratio, selection=self.selection, scale=self.scale, init=self.init,
            rank=self.rank, alpha=self.alpha, seed=self.seed,
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
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def resolve_output_dir(cfg: TrainConfig) -> Path:
    """The run folder, named by rank 0's clock when not given so every rank agrees."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = all_gather_object(time.strftime("%Y%m%d-%H%M%S"))[0]
    return Path("runs") / f"{stamp}-{cfg.method}"


def build_model(model: str, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The frozen base, loaded partitioned under ZeRO-3 (HfDeepSpeedConfig makes HF use zero.Init)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    keep_alive = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None  # noqa: F841
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype)


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
    model = build_model(model_path, ds_config)
    model.config.use_cache = False
    summary = apply_adapters(model, cfg.adapter_config())
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

    start_step = 0
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            start_step = int(load_checkpoint(engine, ckpt, expected=expected)["step"])
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
        for _ in range(accum):
            batch = _to_device(next(batches), device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            tokens += float(batch["attention_mask"].sum())
        step += 1
        elapsed = time.perf_counter() - t0
        loss_value = _mean_over_ranks(sum(losses) / len(losses))
        tokens = _sum_over_ranks([tokens])[0]
        metrics = {
            "loss": loss_value,
            "lr": engine.get_lr()[0],
            "grad_norm": _grad_norm(engine),
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
        stopping = stop.agreed() or step == cfg.halt_at_step
        if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
            save_checkpoint(engine, model, out, step, {**expected, "data_step": step * accum}, keep=cfg.keep_checkpoints)
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
    keep = ("model", "dataset", "method", "n_coeffs", "target_modules", "energy_ratio", "selection", "rank", "alpha", "scale", "init", "seq_len", "seed")
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
