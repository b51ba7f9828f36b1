"""What megaspec's command-line tools share: bad input is one line naming the problem, exit 2."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse that prints `<tool>: error: <message>` on stderr (rank 0 only) and exits 2, not the usage text.

    Flags must be spelled out: an abbreviation (`--max_step` for `--max_steps`) is refused, so a typo
    never silently means another flag; an unknown flag's line names the nearest known one.
    """

    tool = "megaspec"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.tool}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{nearest_flag(self, extras)}")
        return parsed


def nearest_flag(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'; did you mean --x?' for the first unknown flag close to a known one (sub-commands' flags included), else ''."""
    known, todo = set(), [parser]
    while todo:
        for action in todo.pop()._actions:
            known.update(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    for word in unknown:
        close = difflib.get_close_matches(word.split("=")[0], sorted(known), n=1) if word.startswith("--") else []
        if close:
            return f"; did you mean {close[0]}?"
    return ""
