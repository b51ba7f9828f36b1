"""Fetch real assets once per machine: `python -m megaspec.assets smollm2 boolq`.

smollm2          SmolLM2-135M-Instruct: prints the GGUF file, then its HF folder (converted once)
boolq, arc_easy  writes data/<name>.jsonl (training records) and data/<name>.test.jsonl (held out); prints both

Everything is cached under $MEGASPEC_CACHE (default ~/.cache/megaspec); a second call prints the paths at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from megaspec import cli

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

MODELS = ("smollm2",)
DATASETS = ("boolq", "arc_easy")


class Parser(cli.Parser):
    """One-line errors prefixed `assets:` (megaspec.cli)."""

    tool = "assets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m megaspec.assets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", choices=MODELS + DATASETS, metavar="NAME", help=", ".join(MODELS + DATASETS))
    p.add_argument("--out", default=None, help="dataset: the training jsonl to write (default data/<name>.jsonl)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model: the HF folder's dtype")
    args = p.parse_args(argv)
    if args.out is not None and sum(n in DATASETS for n in args.names) != 1:
        p.error("--out names the file of exactly one dataset; fetch datasets one at a time to choose their files")
    return args


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Fetch each named asset and print its paths, one per line; exit 2 with one line when one cannot be had."""
    args = parse_args(argv)
    import torch

    from megaspec.assets import AssetError, smollm2, smollm2_gguf
    from megaspec.assets.tasks import write_task
    from megaspec.train.dsconfig import ConfigError

    try:
        for name in args.names:
            if name == "smollm2":
                print(smollm2_gguf(log), flush=True)
                print(smollm2(getattr(torch, args.dtype), log), flush=True)
            else:
                for path in write_task(name, args.out or f"data/{name}.jsonl", log):
                    print(path, flush=True)
    except (AssetError, ConfigError, OSError) as e:
        print(f"assets: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
