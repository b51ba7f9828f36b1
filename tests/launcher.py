"""Run launch/train.py as a user does: one process, or `deepspeed --num_gpus N` on CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.distributed import CPU_ENV, REPO, free_port


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU run: DeepSpeed's CPU accelerator, one thread per rank, no TTY bars."""
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)  # an in-process test world must not leak its port into launched jobs
    return env


def train_command(args: list[str], ranks: int, script: Path | None = None) -> list[str]:
    """The command line: plain python for 1 rank, the deepspeed launcher for more (`script`: default launch/train.py)."""
    script = str(script or REPO / "launch" / "train.py")
    if "--report" not in args:  # report.html costs seconds per run; the tests that read it ask for it
        args = [*args, "--report", "none"]
    if ranks == 1:
        return [sys.executable, script, *args]
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]


def run_train(
    args: list[str], ranks: int = 1, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
    script: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a training job to completion; the result carries stdout/stderr for assertion messages."""
    command = train_command(args, ranks, script)
    try:
        return subprocess.run(command, cwd=cwd or REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    finally:
        if ranks > 1:
            remove_shm_buffers(int(command[command.index("--master_port") + 1]))


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves a 66 MB /dev/shm file per rank; remove this job's."""
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink(missing_ok=True)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert exit 0, showing the output tail otherwise."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    """The metrics.jsonl records of a run."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss."""
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def parity_task(folder: Path, train: range = range(100, 180), test: range = range(300, 303),
                prompt: str = "Is {n} even?") -> tuple[Path, Path]:
    """A yes/no task in prompt/response records ("is n even?" for each n of `train`), and its held-out file
    (the n of `test`) with answers: the data of bench quality --real's tests."""
    def record(n: int) -> dict:
        return {"prompt": prompt.format(n=n), "response": " yes" if n % 2 == 0 else " no"}

    train_file, test_file = folder / "parity.jsonl", folder / "parity.test.jsonl"
    train_file.write_text("".join(json.dumps(record(n)) + "\n" for n in train))
    test_file.write_text("".join(json.dumps({**record(n), "answers": [record(n)["response"].strip()]}) + "\n" for n in test))
    return train_file, test_file
