"""How a run ends when it cannot go on: the exceptions launch/train.py turns into one line and an exit code.

Exit codes (README "Troubleshooting"): 0 finished, 2 refused (bad input, or a write under the run
folder failed), 3 diverged, 75 stopped early with a checkpoint (a signal or --halt_at_step).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

EXIT_REFUSED = 2
EXIT_DIVERGED = 3
EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: "try again later", here with --resume

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# torch.save and safetensors report a short write as a RuntimeError without an errno
_FULL_MESSAGES = ("No space left", "unexpected pos", "file write failed", "Disk quota exceeded")


class WriteFailed(ValueError):
    """A write under the run folder failed (disk full, quota, I/O error), stated in one line.

    Raised on the rank that saw it (`origin_rank`), which may not be rank 0: launch/train.py prints
    it on that rank, so a rank-local failure is not lost when rank 0 is the one ended by the launcher.
    """

    def __init__(self, message: str, origin_rank: int | None = None) -> None:
        super().__init__(message)
        self.origin_rank = int(os.environ.get("RANK", "0")) if origin_rank is None else origin_rank

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.origin_rank)


def out_of_space(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc` (or an exception it was raised from) means the disk or the quota is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if any(text in str(current) for text in _FULL_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    if where is not None:
        try:
            return shutil.disk_usage(_existing(where)).free < (1 << 20)
        except OSError:
            return False
    return False


def write_failed(exc: BaseException, what: str, where: Path, last_good: str | None) -> WriteFailed:
    """The one-line error for a failed write of `what` under `where`; `last_good`: the checkpoint left intact."""
    if out_of_space(exc, where):
        problem = f"no space left on device writing {what} under {where}"
    else:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        problem = f"writing {what} under {where} failed ({type(exc).__name__}: {detail})"
    if last_good:
        return WriteFailed(f"{problem}; the last good checkpoint {last_good} is untouched: free space (or fix the "
                           "folder), then rerun with --resume")
    return WriteFailed(f"{problem}; no checkpoint had been written yet: free space (or fix the folder), then rerun "
                       "with --overwrite")


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
