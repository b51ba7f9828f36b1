"""What megaspec's command-line tools share: bad input is one line naming the problem, exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse that prints `<tool>: error: <message>` on stderr (rank 0 only) and exits 2, not the usage text.

    Flags must be spelled out: an abbreviation (`--max_step` for `--max_steps`) is refused, so a typo
    never silently means another flag.
    """

    tool = "megaspec"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.tool}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
