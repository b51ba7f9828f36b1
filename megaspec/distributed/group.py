"""Join and leave the job's process group: DeepSpeed's for training, plain torch.distributed for export."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as torch_dist

from megaspec.distributed.comm import barrier, rank


class ProcessGroupError(ValueError):
    """The process group cannot form for a reason the user fixes (a taken port, a bad timeout), in one line."""


def init_distributed() -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPU); a no-op when already joined."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if torch_dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=dist_timeout())
    except Exception as exc:
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
            port, addr = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR")
            raise ProcessGroupError(
                f"the rendezvous port {addr}:{port} is already in use (another job on this node?); pass another "
                "one: deepspeed --master_port PORT ..., torchrun --master_port PORT ..., or MASTER_PORT=PORT"
            ) from exc
        raise
    release_shm_buffers()


def init_ranks() -> None:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPU) when WORLD_SIZE > 1.

    Plain torch.distributed, not deepspeed.init_distributed: export needs only gather and
    gather_object, and on CPU DeepSpeed's communication setup builds a shared-memory
    all-reduce and leaves two 66 MB /dev/shm buffers per rank behind.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch_dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def leave_process_group(wait: bool) -> None:
    """Destroy the process group before the interpreter exits.

    Left to interpreter teardown, the gloo group's worker threads are sometimes destroyed while
    still joinable: the rank then aborts ("terminate called without an active exception", exit
    -6) after a run that finished, and the launcher reports the job failed. `wait`: barrier first,
    so no rank tears down a connection a peer's last collective still uses.
    """
    if not torch_dist.is_initialized():
        return
    if wait:
        torch_dist.barrier()
    torch_dist.destroy_process_group()


def release_shm_buffers() -> list[Path]:
    """Unlink this rank's /dev/shm all-reduce buffer (DeepSpeed's CPU backend) once every rank has mapped it.

    DeepSpeed creates one 66 MB file per rank, named by uid, MASTER_ADDR, MASTER_PORT and rank,
    and every rank maps every peer's file while the process group forms. Unlinked after a barrier,
    the mappings stay valid and the memory goes back when the job ends, however it ends (issue 15:
    they piled up in /dev/shm after every job, SIGKILL included). Returns the paths removed.
    """
    barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank()
    )
    path = Path("/dev/shm") / name
    if not path.exists():
        return []
    path.unlink(missing_ok=True)
    return [path]


def dist_timeout() -> datetime.timedelta:
    """How long a collective waits for a peer before the job fails ($MEGASPEC_DIST_TIMEOUT_S, default 600 s)."""
    text = os.environ.get("MEGASPEC_DIST_TIMEOUT_S", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ProcessGroupError(f"MEGASPEC_DIST_TIMEOUT_S={text!r} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)
