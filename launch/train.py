"""Train spectral adapters under DeepSpeed: `deepspeed launch/train.py --ds_config ds_configs/zero3.json`.

With no model or data arguments this runs the embedded default (a tiny LLaMA and a generated
corpus) on whatever the machine has. Also runs under torchrun and srun (RANK/WORLD_SIZE/... set).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import NoReturn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line on stderr (exit 2), not the usage text."""

    def error(self, message: str) -> NoReturn:
        say(f"train: error: {message}")
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megaspec.quant import QUANTIZE_CHOICES
    from megaspec.train.activations import ATTN_IMPLEMENTATIONS, CHECKPOINTING_CHOICES
    from megaspec.train.loop import TrainConfig

    d = TrainConfig()
    p = Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=d.ds_config, help="DeepSpeed JSON config")
    p.add_argument("--model", default=None, help="local HF model folder, .gguf file (converted once, megaspec.gguf) or hub id (default: embedded tiny LLaMA)")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer folder, sentencepiece tokenizer.model, or hub id")
    p.add_argument("--dataset", default=None, help="local json/jsonl/parquet/txt, a saved datasets folder, or hub id")
    p.add_argument("--method", default=d.method, help="ssh | fourierft | s2ft | lora | smoa | spectral_a | spectral_r")
    p.add_argument("--n_coeffs", type=int, default=d.n_coeffs, help="spectral coefficients per adapted layer")
    p.add_argument("--target_modules", default=",".join(d.target_modules), help="comma-separated linear names")
    p.add_argument("--energy_ratio", type=float, default=d.energy_ratio, help="SSH: fraction chosen by DHT energy")
    p.add_argument("--selection", default=d.selection, choices=["global", "per_layer"], help="SSH selection rule")
    p.add_argument("--rank", type=int, default=d.rank, help="low-rank methods: rank r")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha")
    p.add_argument("--scale", type=float, default=None, help="update scale (default: the method's own)")
    p.add_argument("--init", default=d.init, choices=["zeros", "gaussian"], help="coefficient init")
    p.add_argument("--s2ft_estimate_steps", type=int, default=d.s2ft_estimate_steps,
                   help="S2FT: optimizer steps' worth of batches in the gradient estimate that plans it")
    p.add_argument("--s2ft_estimate_group_mb", type=int, default=d.s2ft_estimate_group_mb,
                   help="S2FT: MiB of fp32 estimate buffers per rank at once; layers beyond it take further passes")
    p.add_argument("--max_steps", type=int, default=d.max_steps)
    p.add_argument("--seq_len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per method)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output_dir", default=None, help="run folder (default runs/<time>-<method>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output_dir")
    p.add_argument("--eval_every", type=int, default=d.eval_every)
    p.add_argument("--save_every", type=int, default=d.save_every)
    p.add_argument("--log_every", type=int, default=d.log_every)
    p.add_argument("--image_every", type=int, default=d.image_every)
    p.add_argument("--halt_at_step", type=int, default=None, help="checkpoint and exit at this step (resume later)")
    p.add_argument("--max_skipped_steps", type=int, default=d.max_skipped_steps,
                   help="steps in a row with a NaN/inf loss that are skipped; one more stops the run (exit 3)")
    p.add_argument("--quantize", default=d.quantize, choices=QUANTIZE_CHOICES,
                   help="frozen base in bitsandbytes 4-bit (nf4, fp4) or 8-bit (int8)")
    p.add_argument("--gradient_checkpointing", default=d.gradient_checkpointing, choices=CHECKPOINTING_CHOICES,
                   help="recompute each decoder layer in the backward instead of keeping its activations; "
                        "auto: on for models above 1B parameters")
    p.add_argument("--attn_implementation", default=None, choices=ATTN_IMPLEMENTATIONS,
                   help="attention kernel, where the model supports it (default: transformers' choice)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run launch/train.py; the exit code says how the run ended (README "Troubleshooting")."""
    from megaspec.distributed.comm import prefer_cpu_accelerator

    prefer_cpu_accelerator()
    args = parse_args(argv)
    import torch.distributed as torch_dist

    from megaspec.distributed.group import leave_process_group
    from megaspec.train.errors import EXIT_DIVERGED, EXIT_REFUSED, EXIT_STOPPED, WriteFailed
    from megaspec.train.loop import TrainConfig, TrainingDiverged, train
    from megaspec.train.validate import validate

    joined_before = torch_dist.is_initialized()  # a caller's group (main(argv) in-process) is the caller's to destroy
    fields = {k: v for k, v in vars(args).items() if k != "local_rank"}
    fields["target_modules"] = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    try:
        cfg = TrainConfig(**fields)
        for warning in validate(cfg):  # before any distributed work: bad input costs seconds, writes nothing
            say(f"train: warning: {warning}")
        result = train(cfg)
    except WriteFailed as e:  # on the rank whose write failed; its exit makes the launcher end the others
        if e.origin_rank == int(os.environ.get("RANK", "0")):
            prefix = "" if e.origin_rank == 0 else f"rank {e.origin_rank}: "
            print(f"train: error: {prefix}{e}", file=sys.stderr, flush=True)
        if not joined_before:
            leave_process_group(wait=False)
        return EXIT_REFUSED
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError and adapter config errors
        say(f"train: error: {str(e).splitlines()[0]}")
        if not joined_before:
            leave_process_group(wait=False)
        return EXIT_REFUSED
    except TrainingDiverged as e:
        say(f"train: error: {e}")
        if not joined_before:
            leave_process_group(wait=True)  # every rank sees the same all-reduced losses and stops together
        return EXIT_DIVERGED
    if not joined_before:
        leave_process_group(wait=True)
    return EXIT_STOPPED if result.get("stopped") else 0


def say(line: str) -> None:
    """One line on stderr, from rank 0 only (every rank reaches the same verdict)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
