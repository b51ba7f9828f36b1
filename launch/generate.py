"""Generate from a run: `python launch/generate.py --run runs/X --prompt "Q: add 3 and 4\nA:"`.

Loads the run's base with its adapter (or, with --merged DIR, a merged checkpoint written by
launch/export.py) and prints the completion of the prompt. "\n" in --prompt is a newline.
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


class Parser(cli.Parser):
    """One-line errors prefixed `generate:` (megaspec.cli)."""

    tool = "generate"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder written by launch/train.py (runs/X)")
    p.add_argument("--merged", default=None, help="merged checkpoint folder (launch/export.py --format merged)")
    p.add_argument("--adapter", default=None, help="adapter or checkpoint folder (default RUN/adapter; e.g. RUN/checkpoints/step-000050)")
    p.add_argument("--prompt", required=True, help='prompt text, e.g. "Q: add 3 and 4\\nA:"')
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat_template", default=None, metavar="auto|none|FILE.jinja",
                   help="wrap --prompt as a user turn with this chat template (auto: the tokenizer's); default: the "
                   "run's --chat_template, so the prompt is shaped as its instruction or chat records were trained. "
                   "A run trained on plain text: none")
    args = p.parse_args(argv)
    problem = sampling_problem(args)
    if problem:
        p.error(problem)
    return args


def sampling_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the decoding numbers, if anything (transformers would raise deep inside generate)."""
    if args.max_new_tokens < 1:
        return f"--max_new_tokens {args.max_new_tokens} must be at least 1"
    if not 0 < args.top_p <= 1:  # also false for nan
        return f"--top_p {args.top_p} must be in (0, 1]; 1 keeps every token"
    if not args.greedy and not (math.isfinite(args.temperature) and args.temperature > 0):
        return f"--temperature {args.temperature} must be a finite number above 0; pass --greedy for argmax decoding"
    return None


def main(argv: list[str] | None = None) -> int:
    from megaspec.distributed.comm import prefer_cpu_accelerator

    prefer_cpu_accelerator()
    args = parse_args(argv)
    from megaspec.export import ExportError
    from megaspec.export.generate import complete, load_for_inference

    try:
        model, tokenizer = load_for_inference(args.run, args.merged, args.adapter)
    except (ExportError, FileNotFoundError, ValueError) as e:  # ValueError: an adapter that does not fit the base
        print(f"generate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from megaspec.train.chat import ChatError, resolve_template

    try:
        template = resolve_template(tokenizer, args.chat_template or run_chat_template(args.run))
        prompt = args.prompt.replace("\\n", "\n")
        text = complete(model, tokenizer, prompt, args.max_new_tokens, args.greedy, args.temperature, args.top_p, args.seed,
                        template)
    except ChatError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    print(text, flush=True)
    return 0


def run_chat_template(run: str) -> str:
    """The run's --chat_template (train_config.json); runs from before chat templates trained without one."""
    import json
    from pathlib import Path

    return str(json.loads((Path(run) / "train_config.json").read_text()).get("chat_template") or "none")


if __name__ == "__main__":
    sys.exit(main())
