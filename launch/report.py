"""Write a run's report: `python launch/report.py runs/X [--out FILE]` (default runs/X/report.html).

One self-contained HTML page (figures inline, no server, no network): loss and eval curves,
learning rate, tokens/s, memory, the budget allocation, the growth heatmap, spectrum images, the
config, the trainable-parameter table and the export commands (megaspec.train.report). A finished
run writes it by itself; this works on unfinished runs too.
"""

from __future__ import annotations

import argparse
import sys

from megaspec import cli


class Parser(cli.Parser):
    """One-line errors prefixed `report:` (megaspec.cli)."""

    tool = "report"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder written by launch/train.py")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")
    args = p.parse_args(argv)
    from megaspec.train.report import write_report

    try:
        path = write_report(args.run, args.out)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({path.stat().st_size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
