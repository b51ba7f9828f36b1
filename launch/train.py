"""Train spectral adapters under DeepSpeed: `deepspeed launch/train.py --ds_config ds_configs/zero3.json`.

With no model or data arguments this runs the embedded default (a tiny LLaMA and a generated
corpus) on whatever the machine has. Also runs under torchrun and srun (RANK/WORLD_SIZE/... set).
Options come from the flags, or from `--config FILE` (YAML or JSON; flags given beside it win).
`python launch/train.py --list_checkpoints runs/X` lists a run's checkpoints (step, loss, world size).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import TYPE_CHECKING

from megaspec import cli

if TYPE_CHECKING:
    from megaspec.train.config import TrainConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


class Parser(cli.Parser):
    """One-line errors prefixed `train:` (megaspec.cli)."""

    tool = "train"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The run's config: TrainConfig's defaults, then --config FILE, then the flags given (megaspec.config)."""
    from megaspec.config import add_config_flag, add_flags, parse_config
    from megaspec.train.config import TrainConfig

    p = Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flag(p)
    add_flags(p, TrainConfig)
    p.add_argument("--list_checkpoints", metavar="RUN", default=None,
                   help="list the checkpoints of run folder RUN (step, loss, world size) and exit; no training")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parse_config(p, TrainConfig, argv)


def main(argv: list[str] | None = None) -> int:
    """Run launch/train.py; the exit code says how the run ended (README "Troubleshooting")."""
    from megaspec.distributed.comm import prefer_cpu_accelerator
    from megaspec.train.host_memory import fix_mmap_threshold

    prefer_cpu_accelerator()
    listing = checkpoints_to_list(argv)
    if listing is not None:
        return list_checkpoints(listing)
    cfg = parse_args(argv)
    try:
        fix_mmap_threshold()  # before the model and data exist (megaspec.train.host_memory)
    except ValueError as e:
        say(f"train: error: {e}")
        return 2
    import torch.distributed as torch_dist

    from megaspec.distributed.group import leave_process_group
    from megaspec.train.errors import EXIT_DIVERGED, EXIT_REFUSED, EXIT_STOPPED, WriteFailed
    from megaspec.train.guard import StopSignal, TrainingDiverged
    from megaspec.train.loop import train
    from megaspec.train.validate import validate

    joined_before = torch_dist.is_initialized()  # a caller's group (main(argv) in-process) is the caller's to destroy
    try:
        for warning in validate(cfg):  # before any distributed work: bad input costs seconds, writes nothing
            say(f"train: warning: {warning}")
        if cfg.show_data:
            if os.environ.get("RANK", "0") == "0":  # under a launcher every rank would print the same examples
                print_data(cfg)
            return 0
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
    if result.get("stopped"):
        StopSignal.ignore_from_now()  # the checkpoint is written: a launcher's SIGTERM must not make this 143
    elif os.environ.get("RANK", "0") == "0":
        print(finished_line(result), flush=True)
    if not joined_before:
        leave_process_group(wait=True)
    return EXIT_STOPPED if result.get("stopped") else 0


def finished_line(result: dict) -> str:
    """Where a finished run went, its last losses and the next command."""
    out = result["output_dir"]
    losses = ", ".join(f"{name} {result[key]:.4f}" for key, name in (("loss", "loss"), ("eval_loss", "eval loss"))
                       if isinstance(result.get(key), (int, float)))
    return (f"finished: {out} (step {result['step']}{', ' + losses if losses else ''}); "
            f"export it with: python launch/export.py --run {out} --out {out}-merged --format merged")


def print_data(cfg: TrainConfig) -> None:
    """--show_data N: the first N formatted training examples on stdout, trained tokens marked (megaspec.train.show_data)."""
    from megaspec.train.loop import data_config, run_tokenizer
    from megaspec.train.show_data import show_data

    print(show_data(data_config(cfg), run_tokenizer(cfg), cfg.show_data, colour=sys.stdout.isatty()), flush=True)


def checkpoints_to_list(argv: list[str] | None) -> str | None:
    """The RUN of --list_checkpoints RUN, which lists and exits instead of training (no other option applies)."""
    p = Parser(add_help=False)
    p.add_argument("--list_checkpoints", metavar="RUN", default=None)
    return p.parse_known_args(argv)[0].list_checkpoints


def list_checkpoints(run: str) -> int:
    """Print one line per checkpoint of `run` (exit 0), or one error line (exit 2) when it holds none."""
    from megaspec.train.checkpoint import list_checkpoints as describe

    try:
        lines = describe(run)
    except ValueError as e:
        say(f"train: error: {e}")
        return 2
    print("\n".join(lines), flush=True)
    return 0


def say(line: str) -> None:
    """One line on stderr, from rank 0 only (every rank reaches the same verdict)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
