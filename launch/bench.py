"""Benchmarks: `python launch/bench.py overhead [--shapes 4096x4096] [--tokens 2048] [--json]`."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def overhead(args: argparse.Namespace) -> None:
    from megaspec.benchmarks import overhead as bench

    rows = []
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.lower().split("x"))
        rows += bench.run((m, n), args.tokens, args.reps, args.warmup, args.device, getattr(torch, args.dtype))
    print(json.dumps(rows, indent=1) if args.json else bench.format_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("overhead", help="forward+backward of a frozen linear alone and with each adapter")
    p.add_argument("--shapes", default="4096x4096", help="comma-separated out x in shapes, e.g. 4096x4096,14336x4096")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=overhead)
    args = parser.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()} torch {torch.__version__} "
          f"threads {torch.get_num_threads()} device {args.device}", file=sys.stderr)
    args.func(args)


if __name__ == "__main__":
    main()
