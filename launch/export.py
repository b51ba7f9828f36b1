"""Export a finished run: `python launch/export.py --run runs/X --out DIR --format merged|peft|megaspec`.

merged:   a standard HF checkpoint of base + update (AutoModelForCausalLM.from_pretrained(DIR)),
          written shard by shard; `deepspeed --num_gpus N launch/export.py ...` splits every
          adapted layer's rows over the ranks.
peft:     an adapter for PeftModel.from_pretrained(base, DIR): FourierFT as peft's FourierFT, LoRA
          as LoRA, every other method as an exact-rank LoRA (or truncated with --lora_rank r).
megaspec: the native adapter folder (a few hundred kB) with a model card.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from megaspec import cli

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

FORMATS = ("merged", "peft", "megaspec")


class Parser(cli.Parser):
    """One-line errors prefixed `export:` (megaspec.cli)."""

    tool = "export"


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder written by launch/train.py (runs/X)")
    p.add_argument("--out", required=True, help="output folder (written to a temp folder, renamed at the end)")
    p.add_argument("--format", required=True, choices=FORMATS, help="merged | peft | megaspec")
    p.add_argument("--lora_rank", type=int, default=None, help="peft: LoRA rank r for every layer (truncated SVD where needed)")
    p.add_argument("--rank", type=int, dest="lora_rank", help=argparse.SUPPRESS)  # its former name, still accepted
    p.add_argument("--lora", action="store_true", help="peft: export as LoRA even when peft has the method (FourierFT)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="weights' dtype (default: the base's; peft: float32)")
    p.add_argument("--adapter", default=None, help="adapter or checkpoint folder to export (default RUN/adapter; e.g. RUN/checkpoints/step-000050)")
    p.add_argument("--max_shard_size", type=positive_float, default=5.0, help="merged: GB per safetensors shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--merge_base", choices=("original", "dequantized"), default=None,
                   help="merged, --quantize runs: add the update to the base checkpoint's own weights (the default "
                        "when its safetensors are at hand) or to the dequantized weights the run trained against")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from megaspec.distributed.comm import prefer_cpu_accelerator

    prefer_cpu_accelerator()
    args = parse_args(argv)
    from megaspec.distributed.group import init_ranks, leave_process_group
    from megaspec.export import ExportError, export

    init_ranks()
    try:
        export(
            args.run, args.out, args.format, lora_rank=args.lora_rank, dtype=args.dtype, adapter=args.adapter, as_lora=args.lora,
            overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_size * 1024**3), merge_base=args.merge_base,
        )
    except (ExportError, OSError) as e:  # OSError: --out or the base became unreadable or unwritable mid-way
        if os.environ.get("RANK", "0") == "0":
            print(f"export: error: {one_line(e)}", file=sys.stderr)
        return 2
    leave_process_group(wait=True)
    return 0


def one_line(error: Exception) -> str:
    """An export error's first line; an OSError as its file and reason (the staged output was removed)."""
    if not isinstance(error, OSError):
        return str(error).splitlines()[0]
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}; nothing was written to --out"


if __name__ == "__main__":
    sys.exit(main())
