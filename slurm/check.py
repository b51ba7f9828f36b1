#!/usr/bin/env python3
"""Say in one line whether a SLURM request can ever be met by its partition's nodes, before sbatch.

    python slurm/check.py --nodes 2 --ntasks-per-node 1 --gpus-per-node 0 slurm/train.sbatch
    python slurm/check.py [sbatch options] SCRIPT && sbatch [sbatch options] SCRIPT [train args]

sbatch accepts a job that no node of the partition can hold (say 8 CPUs per task on 4-CPU nodes)
and leaves it PENDING forever. This reads the script's #SBATCH defaults, lets the same options on
the command line win (as sbatch does), and compares nodes x (tasks x CPUs per task, GPUs) per
node with what `sinfo` reports for each node of the partition, whatever its state. Exit 0 when
the request fits, 2 (one line on stderr) when it never can. Standard library only.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SHORT = {"-N": "nodes", "-c": "cpus-per-task", "-p": "partition"}
KEYS = ("nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "partition")
SINFO = ["sinfo", "--noheader", "--Node", "--format=%N|%c|%G|%P"]


class Refused(Exception):
    """A bad input: main prints its one line after `slurm/check.py: error: ` and exits 2."""


@dataclass(frozen=True)
class Request:
    """What a job asks of each node, and of how many."""

    nodes: int = 1
    tasks: int = 1
    cpus_per_task: int = 1
    gpus: int = 0
    partition: str | None = None  # None: the default partition

    @property
    def cpus(self) -> int:
        return self.tasks * self.cpus_per_task


@dataclass(frozen=True)
class Node:
    """One node of one partition as sinfo reports it."""

    name: str
    cpus: int
    gpus: int
    partition: str
    default: bool


def options(words: list[str]) -> tuple[dict[str, str], int]:
    """The KEYS among leading sbatch-style options (--key=value, --key value, -N 2, -N2), and the index of the first other word."""
    found: dict[str, str] = {}
    i = 0
    while i < len(words) and words[i].startswith("-"):
        word = words[i]
        if word.startswith("--"):
            key, eq, value = word[2:].partition("=")
        else:
            key, eq, value = SHORT.get(word[:2], ""), "", word[2:]
        if key in KEYS and not eq and not value and i + 1 < len(words):
            i += 1
            value = words[i]
        if key in KEYS:
            found[key] = value
        i += 1
    return found, i


def script_defaults(text: str) -> dict[str, str]:
    """The KEYS set by a script's #SBATCH lines (sbatch stops reading them at the first command)."""
    words: list[str] = []
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            words += shlex.split(line[len("#SBATCH"):], comments=True)
        elif line.strip() and not line.startswith("#"):
            break
    return options(words)[0]


def request(argv: list[str]) -> Request:
    """The request of `sbatch ARGV`: the script's #SBATCH defaults overridden by the options before it."""
    given, script = options(argv)
    merged: dict[str, str] = {}
    if script < len(argv):
        try:
            merged = script_defaults(Path(argv[script]).read_text())
        except FileNotFoundError:
            raise Refused(f"{argv[script]} does not exist; pass the sbatch script to check") from None
        except (OSError, UnicodeDecodeError) as e:
            raise Refused(f"cannot read {argv[script]} ({e}); pass the sbatch script to check") from None
    merged.update(given)
    try:
        return Request(nodes=int(merged.get("nodes", 1)), tasks=int(merged.get("ntasks-per-node", 1)),
                       cpus_per_task=int(merged.get("cpus-per-task", 1)), gpus=int(merged.get("gpus-per-node", "0").split(":")[-1]),
                       partition=merged.get("partition"))
    except ValueError as e:
        raise Refused(f"cannot read the request ({e}); write counts as plain numbers, e.g. --nodes 2") from None


def parse_sinfo(text: str) -> list[Node]:
    """Nodes from `sinfo --noheader --Node --format=%N|%c|%G|%P` (GPUs counted from gres such as gpu:a100:8(S:0-1))."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, cpus, gres, partition = line.strip().split("|")
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        nodes.append(Node(name, int(cpus), gpus, partition.rstrip("*"), partition.endswith("*")))
    return nodes


def problem(req: Request, nodes: list[Node]) -> str | None:
    """Why no allocation of the partition's nodes can ever hold `req`, or None when one can."""
    pool = [n for n in nodes if (n.partition == req.partition if req.partition else n.default)]
    where = f"partition {req.partition}" if req.partition else "the default partition"
    if not pool:
        names = sorted({n.partition for n in nodes})
        return f"{where} has no nodes (partitions: {', '.join(names) or 'none'}); pass --partition with one of them"
    fit = [n for n in pool if n.cpus >= req.cpus and n.gpus >= req.gpus]
    if len(fit) >= req.nodes:
        return None
    most_cpus, most_gpus = max(n.cpus for n in pool), max(n.gpus for n in pool)
    return (f"the job asks for {req.nodes} node(s) with {req.cpus} CPUs ({req.tasks} tasks x --cpus-per-task "
            f"{req.cpus_per_task}) and {req.gpus} GPUs each, but {where} has {len(fit)} such node(s) of {len(pool)} "
            f"(at most {most_cpus} CPUs, {most_gpus} GPUs per node); lower --cpus-per-task, --ntasks-per-node, "
            "--gpus-per-node or --nodes, or pick another --partition; sbatch would leave it pending forever")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        req = request(argv)
    except Refused as e:
        print(f"slurm/check.py: error: {e}", file=sys.stderr)
        return 2
    try:
        listing = subprocess.run(SINFO, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        print(f"slurm/check.py: error: cannot run sinfo ({e}); run this where SLURM's clients work", file=sys.stderr)
        return 2
    why = problem(req, parse_sinfo(listing))
    if why:
        print(f"slurm/check.py: error: {why}", file=sys.stderr)
        return 2
    print(f"slurm/check.py: ok: {req.nodes} node(s) x {req.tasks} tasks x {req.cpus_per_task} CPUs, {req.gpus} GPUs per node fit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
