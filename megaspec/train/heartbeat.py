"""A per-rank heartbeat: one stderr line when a phase of the run (a step, a checkpoint) outlasts a minute.

A hung peer (alive but stuck) holds every other rank in its next collective until the collective
times out ($MEGASPEC_DIST_TIMEOUT_S, default 600 s), and then the launcher waits its own 30 s. The
heartbeat says, on each rank that is still alive, where it has been waiting and for how long, so
the rank that prints nothing is the one to look at (issue 15).
"""

from __future__ import annotations

import os
import sys
import threading
import time

DEFAULT_AFTER_S = 60.0


class Heartbeat:
    """A daemon thread printing `rank R: still in <phase> after N s` every `after` seconds a phase lasts."""

    def __init__(self, after: float = DEFAULT_AFTER_S, rank: int | None = None, stream=None, world: int | None = None) -> None:
        self.after = after
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
        self.stream = stream
        self.name = "start-up"
        self.since = time.monotonic()
        self.reported = 0  # lines printed for the current phase
        self.lines: list[str] = []  # every line printed (tests)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = None
        if after > 0:
            self._thread = threading.Thread(target=self._watch, name="megaspec-heartbeat", daemon=True)
            self._thread.start()

    @classmethod
    def from_env(cls) -> Heartbeat:
        """The heartbeat $MEGASPEC_HEARTBEAT_S asks for (seconds; 0 turns it off; default 60)."""
        text = os.environ.get("MEGASPEC_HEARTBEAT_S", str(DEFAULT_AFTER_S))
        try:
            after = float(text)
        except ValueError:
            after = DEFAULT_AFTER_S
        return cls(after if after >= 0 else DEFAULT_AFTER_S)

    def phase(self, name: str) -> None:
        """The run entered `name`; the clock restarts."""
        with self._lock:
            self.name, self.since, self.reported = name, time.monotonic(), 0

    def stop(self) -> None:
        """End the thread (the run is over)."""
        self._stopped.set()

    def _watch(self) -> None:
        tick = min(5.0, self.after / 4)
        while not self._stopped.wait(tick):
            with self._lock:
                waited = time.monotonic() - self.since
                due = waited >= self.after * (self.reported + 1)
                if due:
                    self.reported += 1
                    name = self.name
            if due:
                self._say(name, waited)

    def _say(self, name: str, waited: float) -> None:
        line = f"train: heartbeat: rank {self.rank} still in {name} after {waited:.0f} s"
        if self.world > 1:
            timeout = os.environ.get("MEGASPEC_DIST_TIMEOUT_S", "600")
            line += (f"; if a peer rank is hung, the job fails when a collective times out "
                     f"(MEGASPEC_DIST_TIMEOUT_S={timeout} s)")
        self.lines.append(line)
        print(line, file=self.stream or sys.stderr, flush=True)
