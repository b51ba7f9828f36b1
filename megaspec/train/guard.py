"""How a run notices it must stop: non-finite losses and updates (skip, then give up), and preemption signals."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any

import torch

from megaspec.distributed.comm import sum_over_ranks


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for more than --max_skipped_steps steps in a row; existing checkpoints are kept."""


class NonFiniteGuard:
    """Skips micro-batches whose loss is NaN/inf on any rank (no backward, no update); stops a run that diverged.

    The flag is all-reduced so every rank skips the same micro-batches (ZeRO-3 collectives stay in
    lockstep). A step with no finite micro-batch is skipped whole: DeepSpeed is not called, so the
    weights, optimizer state and LR schedule stay as they were. With gradient accumulation, a step
    with some finite micro-batches updates from those alone (megaspec.train.loop.accumulate).
    """

    def __init__(self, limit: int, skipped: int = 0) -> None:
        self.limit = limit
        self.skipped = skipped  # steps skipped in the whole run (saved with checkpoints)
        self.streak = 0  # steps in a row, up to the current one, skipped or with a non-finite gradient norm
        self.reasons: list[str] = []  # what made the steps of the current streak void

    def finite(self, loss: torch.Tensor) -> bool:
        """Whether this micro-batch's loss is finite on every rank."""
        ok = bool(torch.isfinite(loss.detach()).all())
        return sum_over_ranks([0.0 if ok else 1.0])[0] == 0

    def end_step(self, skipped: bool, grad_norm: float | None = None) -> None:
        """Count a finished step: skipped (no finite micro-batch), or updated with the gradient norm `grad_norm`.

        A void update counts toward the streak too (issue 15: with --lr 1e30 the coefficients reached
        2e30, RMSNorm's variance overflowed to inf, the hidden states became 0, the loss sat at
        ln(vocab) with a gradient norm of exactly 0, and the run "finished" with exit 0): a gradient
        norm that is not finite (clipping then scales the update to 0 or NaN), or exactly 0 with a
        finite loss (no trainable parameter reaches the loss any more; zero-initialised adapters still
        get a non-zero gradient at step 1). The norm is all-reduced by DeepSpeed, so every rank agrees.
        None: the config does not compute it.
        """
        if skipped:
            reason = "loss is not finite"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            reason = "gradient norm is not finite"
        elif grad_norm == 0.0:
            reason = "gradient norm is exactly 0 (the loss no longer depends on the adapter)"
        else:
            reason = None
        self.reasons = ([] if not self.streak else self.reasons) + ([reason] if reason and reason not in self.reasons else [])
        self.streak = self.streak + 1 if reason else 0
        self.skipped += int(skipped)

    def diverged(self) -> bool:
        """More than `limit` steps in a row were skipped or had a void update."""
        return self.streak > self.limit

    def message(self, step: int) -> str:
        """The one line that stops the run."""
        return (
            f"{' and '.join(self.reasons)} at step {step}: {self.streak} steps in a row (from step "
            f"{step - self.streak + 1}) exceed --max_skipped_steps {self.limit}; the run's checkpoints keep the last "
            "good state: lower --lr or check the data, then --resume"
        )


def coefficients_finite(trainable: list[torch.nn.Parameter]) -> bool:
    """Whether every trainable parameter is finite on every rank (this rank's ZeRO-3 partition; all-reduced)."""
    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p.data)).all()) for p in trainable)
    return sum_over_ranks([0.0 if ok else 1.0])[0] == 0


class StopSignal:
    """SIGTERM/SIGUSR1 (SLURM preemption) and a first Ctrl-C set a flag; the loop checkpoints and exits at the step's end.

    A second Ctrl-C interrupts at once, as Python does by default.
    """

    def __init__(self, watch_launcher: bool = True) -> None:
        self.received: int | None = None
        self.orphaned: str | None = None  # the launcher process that went away, once it has
        self.orphaned_elsewhere = False  # another rank saw its launcher go (agreed() says)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)
        launchers = deepspeed_launchers() if watch_launcher else []
        if launchers:
            threading.Thread(target=self._watch, args=(launchers,), name="megaspec-launcher-watch", daemon=True).start()

    def _watch(self, launchers: list[tuple[int, float, str]], every: float = 2.0) -> None:
        """Stop like a SIGTERM when the deepspeed launcher is gone (its single-node runner does not pass signals on)."""
        while self.orphaned is None:
            for pid, started, what in launchers:
                if not _alive(pid, started):
                    self.orphaned = f"{what} (pid {pid}) exited"
                    break
            time.sleep(every)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def reason(self) -> str:
        """Why the run stops, for the log line."""
        if self.received:  # a signal says more than the launcher it also ended (SLURM signals every process)
            return f"signal {signal.Signals(self.received).name}"
        if self.orphaned:
            return f"the {self.orphaned}"
        if self.orphaned_elsewhere:
            return "the deepspeed launcher exited (seen first by another rank)"
        return "halt_at_step or a signal on another rank"

    @staticmethod
    def ignore_from_now() -> None:
        """Ignore SIGTERM/SIGUSR1 once a stopped run's checkpoint is written and only teardown is left.

        srun --kill-on-bad-exit and the deepspeed launcher SIGTERM the other ranks as soon as one exits 75;
        Python puts back SIG_DFL while it finalizes (but keeps SIG_IGN), so a rank still tearing down would
        die with 143 and the job would not read as stopped.
        """
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    def agreed(self) -> bool:
        """True on every rank once any rank got the signal or lost its launcher (ranks must stop at the same step)."""
        # snapshot: the watcher thread may set both fields between the two reads
        received, orphaned = self.received, self.orphaned
        lost = orphaned is not None
        stop, lost_somewhere = sum_over_ranks([1.0 if received is not None or lost else 0.0, 1.0 if lost else 0.0])
        self.orphaned_elsewhere = lost_somewhere > 0
        return stop > 0


LAUNCH_MODULE = "deepspeed.launcher.launch"


def deepspeed_launchers(pid: int | None = None) -> list[tuple[int, float, str]]:
    """(pid, start time, name) of the deepspeed launcher processes above this rank: launch.py and the runner above it.

    Killing the `deepspeed` command (a SIGTERM from `kill` or `timeout`) ends only its runner on one node:
    launch.py and the ranks live on, orphaned, training on. A rank that watches both stops with a
    checkpoint instead. Empty when the rank was not started by the deepspeed launcher (python, srun, torchrun).
    """
    import psutil

    try:
        parent = psutil.Process(pid or os.getpid()).parent()
        if parent is None or LAUNCH_MODULE not in " ".join(parent.cmdline()):
            return []
        found = [(parent.pid, parent.create_time(), "deepspeed launcher")]
        runner = parent.parent()
        if runner is not None and any("deepspeed" in os.path.basename(part) for part in runner.cmdline()[:2]):
            found.append((runner.pid, runner.create_time(), "deepspeed command"))
        return found
    except (psutil.Error, OSError):
        return []


def _alive(pid: int, started: float) -> bool:
    """The process `pid` that started at `started` still runs (not a zombie, not a new process with its pid)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
