"""Run a function or a script on N local ranks (gloo on CPU) for multi-process tests.

    results = run_ranks(worker, 2, args=(tmp_path,))        # worker(*args) on ranks 0 and 1
    results[1].value                                        # what rank 1's worker returned

Each rank is a fresh `python` process in its own session, with the torch.distributed
environment (MASTER_ADDR/PORT on a free port, RANK, WORLD_SIZE, LOCAL_RANK) and, by default,
DeepSpeed's CPU accelerator. The target function must be defined at module level in an
importable file (a test module is fine); its arguments and return value travel by pickle.

Solid against the usual hangs: when one rank fails, the others (stuck in a collective) are
killed after `grace` seconds; on `timeout` every rank's process group is killed. A failure
raises AssertionError with each failed rank's exit status and the tail of its stderr/stdout.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# One CPU thread per rank: tests run several ranks on a machine with few cores.
CPU_ENV = {
    "DS_ACCELERATOR": "cpu",
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
PORT_TAKEN = ("EADDRINUSE", "Address already in use", "address already in use")


@dataclass
class RankResult:
    """What one rank left behind: exit status (None if it was killed), return value, output."""

    rank: int
    returncode: int | None
    value: Any
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The torch.distributed / DeepSpeed launcher variables of one local rank.

    LOCAL_SIZE is left out on purpose: the `deepspeed` launcher sets it, and then DeepSpeed's CPU
    shared-memory all-reduce creates two 66 MB /dev/shm segments per rank that it never unlinks.
    """
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
    }


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    init: str | None = "deepspeed",
    timeout: float = 300.0,
    grace: float = 10.0,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> list[RankResult]:
    """Call fn(*args, **kwargs) on `world_size` ranks; `init` is "deepspeed", "torch" (gloo) or None."""
    if init not in ("deepspeed", "torch", None):
        raise ValueError(f"init={init!r}; use 'deepspeed', 'torch' or None")
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        job = Path(tmp)
        spec = {"file": inspect.getfile(fn), "module": fn.__module__, "name": fn.__qualname__}
        spec.update(args=tuple(args), kwargs=kwargs or {}, init=init)
        (job / "spec.pkl").write_bytes(pickle.dumps(spec))
        command = [sys.executable, str(Path(__file__).resolve()), str(job)]
        results = _launch(command, world_size, job, timeout, grace, env)
        for result in results:
            value_file = job / f"value{result.rank}.pkl"
            if result.ok and value_file.exists():
                result.value = pickle.loads(value_file.read_bytes())
    if check:
        assert_ok(results)
    return results


def run_script(
    argv: Sequence[str],
    world_size: int = 2,
    *,
    timeout: float = 300.0,
    grace: float = 10.0,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> list[RankResult]:
    """Run `python *argv` on `world_size` ranks (the script initialises torch.distributed itself)."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        results = _launch([sys.executable, *argv], world_size, Path(tmp), timeout, grace, env)
    if check:
        assert_ok(results)
    return results


def assert_ok(results: list[RankResult], tail: int = 4000) -> None:
    """AssertionError naming every failed rank, with its exit status and output tails."""
    failed = [r for r in results if not r.ok]
    if not failed:
        return
    parts = []
    for r in failed:
        status = (
            f"exit code {r.returncode}"
            if r.returncode is not None
            else "killed (timeout or another rank failed)"
        )
        parts.append(
            f"--- rank {r.rank}: {status} after {r.seconds:.1f}s\n"
            f"stderr (tail):\n{r.stderr[-tail:]}\nstdout (tail):\n{r.stdout[-tail // 4 :]}"
        )
    raise AssertionError(f"{len(failed)} of {len(results)} ranks failed\n" + "\n".join(parts))


def _launch(
    command: list[str], world_size: int, job: Path, timeout: float, grace: float, env: dict[str, str] | None
) -> list[RankResult]:
    """Start the ranks, wait for them, kill stragglers; retry once with a new port if it was taken."""
    for attempt in range(3):
        results = _launch_once(command, world_size, job, timeout, grace, env, attempt)
        port_clash = any(not r.ok and any(s in r.stderr for s in PORT_TAKEN) for r in results)
        if not port_clash:
            break
    return results


def _launch_once(
    command: list[str],
    world_size: int,
    job: Path,
    timeout: float,
    grace: float,
    env: dict[str, str] | None,
    attempt: int,
) -> list[RankResult]:
    port = free_port()
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    procs, logs = [], []
    start = time.monotonic()
    try:
        for rank in range(world_size):
            rank_vars = {**os.environ, **CPU_ENV, "PYTHONPATH": pythonpath, **(env or {})}
            rank_vars.update(rank_env(rank, world_size, port))
            out = open(job / f"stdout{rank}.{attempt}", "w+")
            err = open(job / f"stderr{rank}.{attempt}", "w+")
            logs.append((out, err))
            procs.append(
                subprocess.Popen(
                    command, env=rank_vars, cwd=REPO, stdout=out, stderr=err, start_new_session=True
                )
            )
        ended: list[float | None] = [None] * world_size
        first_failure = None
        while any(e is None for e in ended):
            now = time.monotonic()
            for rank, proc in enumerate(procs):
                if ended[rank] is None and proc.poll() is not None:
                    ended[rank] = now - start
                    if proc.returncode != 0 and first_failure is None:
                        first_failure = now
            if now - start > timeout or (first_failure is not None and now - first_failure > grace):
                break
            time.sleep(0.05)
    finally:
        killed = [proc.poll() is None for proc in procs]
        for proc in procs:
            _kill_group(proc)
        results = []
        for rank, (proc, (out, err)) in enumerate(zip(procs, logs, strict=True)):
            out.seek(0)
            err.seek(0)
            seconds = time.monotonic() - start if killed[rank] else (ended[rank] or 0.0)
            returncode = None if killed[rank] else proc.returncode
            results.append(RankResult(rank, returncode, None, out.read(), err.read(), seconds))
            out.close()
            err.close()
    return results


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL the rank's whole process group (it may have started children)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                # the leader exited; still sweep up any children left in its group
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _rank_main(job: Path) -> None:
    """Inside one rank: initialise torch.distributed, run the target, save its return value."""
    spec = pickle.loads((job / "spec.pkl").read_bytes())
    sys.path.insert(0, str(Path(spec["file"]).parent))
    try:
        module = importlib.import_module(spec["module"])
    except ModuleNotFoundError:
        loader = importlib.util.spec_from_file_location(spec["module"], spec["file"])
        module = importlib.util.module_from_spec(loader)
        sys.modules[spec["module"]] = module
        loader.loader.exec_module(module)
    fn = module
    for part in spec["name"].split("."):
        fn = getattr(fn, part)
    import torch.distributed as torch_dist

    if spec["init"] == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    elif spec["init"] == "torch":
        torch_dist.init_process_group("gloo")
    value = fn(*spec["args"], **spec["kwargs"])
    (job / f"value{os.environ['RANK']}.pkl").write_bytes(pickle.dumps(value))
    if torch_dist.is_initialized():
        torch_dist.barrier()  # nobody tears down a connection that a peer's last collective still uses
        torch_dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown of torch/transformers/deepspeed: seconds per rank on a busy
    # machine, and nothing is left to save (the value file is written and closed above).
    os._exit(0)


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
