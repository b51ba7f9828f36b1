"""Benchmarks: `python launch/bench.py <overhead|crossover|params|memory|selection|quality|throughput|load> [--json]`.

Each prints a table to stdout (or, with --json, one JSON object: command, machine, date, result)
and asserts nothing; the machine line goes to stderr. Measured numbers live in BENCHMARKS.md.

    python launch/bench.py overhead --shapes 4096x4096,4096x14336 --tokens 2048
    python launch/bench.py crossover
    python launch/bench.py params
    python launch/bench.py memory [--validate]
    python launch/bench.py selection
    python launch/bench.py quality
    python launch/bench.py throughput --layers 4          # CUDA only; the ZeRO-3 engine (--engine plain: PyTorch)
    python launch/bench.py load                           # per-rank peak of loading bf16/nf4/int8 under ZeRO-3, 1 and 2 CPU ranks
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megaspec.benchmarks.common import LLAMA_CONFIGS, machine, parse_methods, table
from megaspec.train.dsconfig import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _shape(text: str) -> tuple[int, int]:
    m, n = (int(v) for v in text.lower().split("x"))
    return m, n


def _modes(text: str) -> str:
    modes = text.split(",")
    if not modes or set(modes) - {"full", "branch"}:
        raise argparse.ArgumentTypeError(f"{text!r}: use full, branch or full,branch")
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {err}") from None
    return text


def overhead(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import overhead as bench

    rows = []
    for shape in args.shapes.split(","):
        m, n = _shape(shape)
        if args.device == "cpu" and "full" in args.modes and 4 * m * n * args.tokens > 1e12:
            print(f"note: {shape} at {args.tokens} tokens is {4 * m * n * args.tokens / 1e12:.1f} TFLOP per frozen "
                  "step; on a CPU pass a smaller --tokens", file=sys.stderr)
        rows += bench.run(_shape(shape), args.tokens, args.reps, args.warmup, args.device, getattr(torch, args.dtype),
                          parse_methods(args.methods), synthetic=not args.real_svd, settle=args.settle,
                          modes=tuple(args.modes.split(",")), only=args.variants)
    return rows, bench.format_table(rows)


def crossover(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import crossover as bench

    rows = bench.run([_shape(s) for s in args.shapes.split(",")], _ints(args.n), _ints(args.tokens), args.reps, args.threads)
    return rows, bench.format_table(rows)


def params(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import params as bench

    rows = bench.run(args.models.split(","), parse_methods(args.methods))
    return rows, table(rows, bench.COLUMNS)


def memory(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import memory as bench

    if args.validate:
        rows = bench.validate()
        return rows, table(rows, bench.VALIDATE_COLUMNS)
    result = bench.run(args.models.split(","), tuple(args.precisions.split(",")), _ints(args.world_sizes),
                       args.micro_batch, args.seq_len, parse_methods(args.methods))
    return result, bench.format_table(result)


def selection(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import selection as bench

    result = bench.run(args.model, args.dtype, args.n_coeffs, args.energy_ratio, _ints(args.world_sizes), args.threads,
                       _ints(args.ranks), args.rank_layers, args.rank_width, combine=not args.no_combine)
    return result, bench.format_table(result)


def quality(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import quality as bench

    lrs = tuple(float(v) for v in args.lrs.split(",")) if args.lrs else None
    rows = bench.run(args.steps, _ints(args.seeds), parse_methods(args.methods), lrs, args.jobs, args.threads,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    return rows, bench.format_table(rows)


def throughput(args: argparse.Namespace) -> tuple[Any, str] | None:
    from megaspec.benchmarks import throughput as bench

    ds_config = None
    if args.engine == "deepspeed":  # read first: a bad config is reported on any machine
        from megaspec.train.dsconfig import read_ds_config

        ds_config = read_ds_config(args.ds_config)
    if not torch.cuda.is_available():
        print(bench.NO_CUDA)
        return None
    settings = None
    if args.methods:
        from megaspec.benchmarks.common import paper_settings

        settings = [bench.FROZEN, *paper_settings(parse_methods(args.methods))]
    rows = bench.run(args.layers, args.batch, args.seq_len, args.steps, args.warmup, "cuda", getattr(torch, args.dtype),
                     settings, args.peak_tflops, ds_config=ds_config)
    return rows, bench.format_table(rows)


def load(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import load as bench

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    result = bench.run(_ints(args.world_sizes), tuple(args.precisions.split(",")), tuple(args.paths.split(",")), overrides, args.folder)
    return result, bench.format_table(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="one JSON object (command, machine, date, result) instead of a table")
    models = ",".join(LLAMA_CONFIGS)
    methods_help = "comma-separated registered methods (and peft_lora, peft_fourierft where they apply); default all"

    p = sub.add_parser("overhead", parents=[common], help="forward+backward of a frozen linear alone and with each adapter")
    p.add_argument("--shapes", default="4096x4096,4096x14336,8192x28672", help="comma-separated out x in shapes")
    p.add_argument("--tokens", type=int, default=2048, help="B tokens per step (on CPU use fewer for 8192x28672)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", default=None, help=methods_help)
    p.add_argument("--real-svd", action="store_true", help="plan SVD-based methods with the real SVD (slow on CPU)")
    p.add_argument("--settle", type=int, default=1, help="untimed steps of a variant right before each timed one")
    p.add_argument("--modes", default="full,branch", type=_modes,
                   help="full (frozen matmul + adapter), branch (the adapter alone: frozen matmul swapped for zeros), or both")
    p.add_argument("--variants", default=None, type=_regex, metavar="REGEX",
                   help="only the rows whose name matches REGEX (and the frozen base), e.g. 'ssh n=750 \\(fast|peft lora r=16'")
    p.set_defaults(func=overhead)

    p = sub.add_parser("crossover", parents=[common], help="sparse-spectrum forward: FFT path vs building dW, by layer size")
    p.add_argument("--shapes", default="64x64,128x128,256x256,512x512,1024x1024")
    p.add_argument("--n", default="8,100,1000", help="comma-separated coefficient counts")
    p.add_argument("--tokens", default="64,2048", help="comma-separated token counts B")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=crossover)

    p = sub.add_parser("params", parents=[common], help="trainable parameters per method at its paper setting (meta device)")
    p.add_argument("--models", default=models)
    p.add_argument("--methods", default=None, help=methods_help)
    p.set_defaults(func=params)

    p = sub.add_parser("memory", parents=[common], help="per-rank bytes: frozen base, activations, adapter state")
    p.add_argument("--models", default=models)
    p.add_argument("--precisions", default="bf16,nf4,nf4-dq,int8")
    p.add_argument("--world-sizes", default="1,2,8,16,64")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--methods", default=None, help=methods_help)
    p.add_argument("--validate", action="store_true", help="formula vs measured bytes on tiny real models")
    p.set_defaults(func=memory)

    p = sub.add_parser("selection", parents=[common], help="time and peak memory of SSH planning, per layer and extrapolated")
    p.add_argument("--model", default="llama-3-70b", choices=sorted(LLAMA_CONFIGS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the gathered weight")
    p.add_argument("--n-coeffs", type=int, default=750)
    p.add_argument("--energy-ratio", type=float, default=0.5)
    p.add_argument("--world-sizes", default="1,8,16,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ranks", default="1,2", help="CPU rank counts of the measured ZeRO-3 run")
    p.add_argument("--rank-layers", type=int, default=4)
    p.add_argument("--rank-width", type=int, default=2048)
    p.add_argument("--no-combine", action="store_true", help="skip the combine-step measurement")
    p.set_defaults(func=selection)

    p = sub.add_parser("quality", parents=[common], help="fine-tune the tiny pretrained LLaMA with every method at matched budgets")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=None, help=methods_help)
    p.add_argument("--lrs", default=None, help="a fixed lr list for every row instead of the sweep rule")
    p.add_argument("--jobs", type=int, default=2, help="rows run in this many worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.set_defaults(func=quality)

    p = sub.add_parser("throughput", parents=[common], help="tokens/s and MFU of a LLaMA-3.1-8B-shaped model on one GPU")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to build (default all 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", default=None, help="registered methods at their paper settings (default ssh, lora r=16)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s of the GPU (default: by name)")
    p.add_argument("--engine", default="deepspeed", choices=["deepspeed", "plain"],
                   help="deepspeed: the trainer's ZeRO-3 engine on one rank (default); plain: PyTorch and AdamW alone")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero3.json"), help="DeepSpeed config of --engine deepspeed")
    p.set_defaults(func=throughput)

    p = sub.add_parser("load", parents=[common], help="per-rank peak memory and time of loading the base under ZeRO-3, whole vs quantize on load")
    p.add_argument("--world-sizes", default="1,2", help="CPU rank counts")
    p.add_argument("--precisions", default="bf16,nf4,int8")
    p.add_argument("--paths", default="whole,stream", help="whole (from_pretrained on every rank), stream (quantize on load)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the synthetic model (default 16: 0.55B parameters)")
    p.add_argument("--folder", default=None, help="write (or reuse) the synthetic checkpoint here instead of a temporary folder")
    p.set_defaults(func=load)

    args = parser.parse_args()
    header = machine()
    print(f"# {header}", file=sys.stderr)
    date = time.strftime("%Y-%m-%d")
    try:
        out = args.func(args)
    except ConfigError as err:  # bad input: one line naming the problem and the fix
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if out is None:
        return
    result, text = out
    if args.json:
        print(json.dumps({"command": ["python", "launch/bench.py", *sys.argv[1:]], "machine": header, "date": date,
                          "result": result}, indent=1, default=str))
    else:
        print(text)


if __name__ == "__main__":
    main()
