"""launch/train.py with rank 0 seeing a NaN loss in every micro-batch of the steps named first (tests of the skip logic).

    deepspeed --num_gpus 2 tests/nan_train.py 4,7,8,9 --max_steps 12 ...

The hook lives here, in the tests: it wraps megaspec.train.loop.train_step so that, in those steps,
rank 0's NonFiniteGuard judges the loss times NaN; the all-reduce in NonFiniteGuard.finite then
makes every rank skip the micro-batch, as a real NaN on one rank would.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

from megaspec.distributed.comm import rank
from megaspec.train import loop

# the deepspeed launcher puts --local_rank=N before the script's own arguments
FIRST = next(i for i, arg in enumerate(sys.argv) if i > 0 and not arg.startswith("--local_rank"))
NAN_STEPS = {int(s) for s in sys.argv.pop(FIRST).split(",") if s.strip()}
train_step = loop.train_step


def poisoned_train_step(run: Any, batches: Any, step: int) -> dict[str, float]:
    """train_step, with rank 0's loss made NaN in the listed steps."""
    if step not in NAN_STEPS or rank() != 0:
        return train_step(run, batches, step)
    finite = run.guard.finite
    run.guard.finite = lambda loss: finite(loss * float("nan"))
    try:
        return train_step(run, batches, step)
    finally:
        del run.guard.finite


loop.train_step = poisoned_train_step
sys.argv[0] = str(Path(__file__).resolve().parents[1] / "launch" / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
