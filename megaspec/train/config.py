"""The training run's configuration: the adapter's config nested in it, every option declared once with its help."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megaspec.adapters import adapter_class
from megaspec.config import AdapterConfig, flat_dict, option, resume_values, to_yaml
from megaspec.quant import QUANTIZE_CHOICES
from megaspec.train.activations import ATTN_IMPLEMENTATIONS, CHECKPOINTING_CHOICES


@dataclass
class TrainConfig:
    """Everything a run needs besides the DeepSpeed config (micro-batch, precision, ZeRO stage)."""

    ds_config: str = option("ds_configs/zero3.json", "DeepSpeed JSON config", flags=("--ds_config", "--deepspeed_config"))
    model: str | None = option(None, "local HF model folder, .gguf file (converted once, megaspec.gguf) or hub id "
                               "(default: the embedded tiny LLaMA, megaspec.train.embedded)", resume=True)
    tokenizer: str | None = option(None, "HF tokenizer folder, sentencepiece tokenizer.model, or hub id "
                                   "(default: the model's own, or the embedded tokenizer)")
    dataset: str | None = option(None, "local json/jsonl/parquet/txt, a saved datasets folder, or hub id "
                                 "(default: the embedded instruction task)", resume=True)
    eval_dataset: str | None = option(None, "held-out records for evaluation, in --dataset's format (a file, saved datasets "
                                      "folder or hub id); every record of --dataset then trains (default: hold out "
                                      "--eval_fraction of --dataset)", resume="when_set")
    eval_fraction: float = option(0.05, "fraction of --dataset's records held out for evaluation when there is no "
                                  "--eval_dataset (at least one record; 0: no evaluation)", resume="when_set")
    split_seed: int | None = option(None, "seeds which records --eval_fraction holds out (default: --seed); fix it to "
                                    "compare runs of different seeds on the same eval records", resume="when_set")
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    s2ft_estimate_group_mb: int = option(1024, "S2FT: MiB of fp32 estimate buffers per rank at once; layers beyond it "
                                         "take further passes (megaspec.calibrate)")
    max_steps: int = option(100, "optimizer steps of the run")
    seq_len: int = option(128, "tokens per training block", resume=True)
    packing: str = option("isolated", "records into blocks: isolated concatenates them with per-document positions and "
                          "attention (no cross-document attention), naive concatenates them, none gives each its own "
                          "block (truncated, padded)", choices=("none", "naive", "isolated"), resume="when_set")
    chat_template: str = option("auto", "chat template for messages/conversations and prompt/response records: auto (the "
                                "tokenizer's, if any), none (plain prompt + response), or a .jinja file",
                                resume="when_set")
    show_data: int = option(0, "print the first N training examples as trained, trained tokens marked, and exit "
                            "(no DeepSpeed, nothing written)")
    lr: float | None = option(None, "peak learning rate (default: the method's, Adapter.default_lr)")
    warmup_ratio: float = option(0.06, "fraction of max_steps of linear LR warmup")
    seed: int = option(42, "seeds the data order, the adapter's plan and its parameters", resume=True)
    output_dir: str | None = option(None, "run folder (default runs/<time>-<method>)")
    resume: bool = option(False, "continue from the latest checkpoint in --output_dir")
    overwrite: bool = option(False, "replace an existing run in --output_dir")
    eval_every: int = option(50, "steps between evaluations (0: never)")
    eval_batches: int = option(20, "micro-batches per rank of each evaluation")
    save_every: int = option(50, "steps between checkpoints")
    log_every: int = option(1, "steps between metric and spectral logs")
    image_every: int = option(50, "steps between spectral images in TensorBoard")
    keep_checkpoints: int = option(2, "checkpoints kept in the run folder (older ones are deleted)")
    max_skipped_steps: int = option(10, "steps in a row with a NaN/inf loss that are skipped; one more stops the run (exit 3)")
    halt_at_step: int | None = option(None, "checkpoint and exit at this step, as if preempted (resume later)")
    quantize: str = option("none", "frozen base in bitsandbytes 4-bit (nf4, fp4) or 8-bit (int8) (megaspec.quant)",
                           choices=QUANTIZE_CHOICES, resume=True)
    gradient_checkpointing: str = option("auto", "recompute each decoder layer in the backward instead of keeping its "
                                         "activations; auto: on for models above 1B parameters",
                                         choices=CHECKPOINTING_CHOICES)
    attn_implementation: str | None = option(None, "attention kernel, where the model supports it (default: transformers' "
                                             "choice)", choices=ATTN_IMPLEMENTATIONS)
    report: str = option("html", "the run report written when a run finishes: html (report.html and figures/, "
                         "megaspec.train.report; launch/report.py writes it later too) or none", choices=("html", "none"))
    data_cache: str | None = option(None, "folder of the tokenized-data cache: each node's local rank 0 tokenizes once, "
                                    "the other ranks and later runs with the same inputs load the blocks "
                                    "(megaspec.train.data_cache; default $MEGASPEC_CACHE/tokenized, i.e. "
                                    "~/.cache/megaspec/tokenized); none: every rank tokenizes, nothing cached")
    report_to: str = option("tensorboard", "where metrics and figures go, comma-separated: tensorboard, wandb, mlflow "
                            "(used when installed), all or none (megaspec.train.trackers)")

    def __post_init__(self) -> None:
        # the run's seed is the adapter's: one --seed makes the whole run reproducible
        self.adapter.seed = self.seed

    def learning_rate(self) -> float:
        """--lr, or the method's default."""
        return self.lr if self.lr is not None else adapter_class(self.adapter.method).default_lr


def resume_keys(cfg: TrainConfig, former: bool = False) -> dict[str, Any]:
    """What must match for --resume to continue a run (not max_steps, not logging cadence): the fields marked resume.

    former=True: renamed fields under their former names, the form a checkpoint's config_hash is taken of.
    """
    return resume_values(cfg, former)


def run_record(cfg: TrainConfig, base_folder: str | None) -> dict[str, Any]:
    """train_config.json: one key per option (the flags' names) and the HF folder the base was loaded from."""
    return {**flat_dict(cfg), "base_folder": base_folder}


# run-folder options: a saved config.yaml starts a new run wherever --output_dir (or the default) says
RUN_FOLDER_OPTIONS = ("output_dir", "resume", "overwrite")


def run_config_yaml(cfg: TrainConfig, out: str) -> str:
    """config.yaml of a run: every option but the run-folder ones; `--config` with it trains the same run again."""
    header = (f"megaspec run {out}: its resolved options (paths relative to where it was started).\n"
              f"Train it again: deepspeed launch/train.py --config {out}/config.yaml --output_dir NEW_FOLDER")
    return to_yaml(cfg, header, leave_out=RUN_FOLDER_OPTIONS)
