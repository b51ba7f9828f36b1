"""Atomic, verifiable training checkpoints: adapter + DeepSpeed engine state + trainer state + manifest.

Layout of `output_dir/checkpoints/`:

    step-000010/adapter/            megaspec.model.save_adapter (loadable without DeepSpeed)
    step-000010/engine/step-000010/ engine.save_checkpoint: per-rank optimizer partitions, step
    step-000010/training_state.safetensors  fp32 masters and optimizer moments by name (any world size)
    step-000010/trainer_state.json  step, global batch and samples, LR schedule, every rank's RNG states, digests, ...
    step-000010/manifest.json       size and sha256 of every other file, written last
    latest                          the tag of the last complete save (os.replace)

A save is written to `.tmp-step-000010` and renamed only once complete, so a crash leaves
a `.tmp-*` directory that is never read. Collective: save_checkpoint, latest_checkpoint and
load_checkpoint must be called on every rank; rank 0 alone renames, hashes and decides,
and its decision is broadcast so all ranks resume from the same checkpoint.

Resuming reads training_state.safetensors, not DeepSpeed's per-rank partitions, so a checkpoint
written by N ranks resumes on M (megaspec.train.training_state); engine/ stays for DeepSpeed's
own tools (zero_to_fp32.py) and for checkpoints written before training_state existed.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megaspec.distributed import plan_digest
from megaspec.distributed.comm import broadcast_from_rank0, gather_to_rank0, rank, world_size
from megaspec.model import CONFIG_NAME, WEIGHTS_NAME, adapters_of, save_adapter
from megaspec.train import training_state
from megaspec.train.errors import write_failed
from megaspec.train.global_batch import ranks_word

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
FORMAT = 2  # 2: with training_state.safetensors (resumable on any number of ranks)
_STEP_DIR = re.compile(r"step-(\d+)")


def step_tag(step: int) -> str:
    """The directory name (and DeepSpeed tag) of the checkpoint at `step`."""
    return f"step-{step:06d}"


def config_hash(config: Any) -> str:
    """sha256 of a config (dataclass or JSON-able) as canonical JSON, to store and compare on resume."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def positions_digest(model: nn.Module) -> str:
    """sha256 over every adapter's plan buffers; equals the `digest` apply_adapters reports."""
    layers = [plan_digest(name, adapter.plan_state()) for name, adapter in adapters_of(model).items()]
    return hashlib.sha256("".join(layers).encode()).hexdigest()


# --- RNG states as JSON ------------------------------------------------------------------------
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and current CUDA device) RNG states, JSON-serialisable."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# --- collective helpers ------------------------------------------------------------------------
def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 and give every rank its result; an error on rank 0 is raised on every rank.

    Doubles as a barrier, and unlike a bare barrier it does not leave the other ranks hanging
    when rank 0 fails (disk full, a checkpoint that does not verify).
    """
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as exc:
            if world_size() == 1:
                raise
            error = exc
    if world_size() > 1:
        try:
            pickle.dumps(error)
        except Exception:
            error = RuntimeError(f"checkpoint step failed on rank 0: {error!r}")
        result, error = broadcast_from_rank0((result, error))
    if error is not None:
        raise error
    return result


# --- manifest ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> dict[str, Any]:
    """Hash every file under `directory` (fsyncing it) and write manifest.json last, atomically."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": 1, "files": files}
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    return manifest


def _manifest_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` is not usable, or None when every listed file matches."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__}: {exc})"
    required = [TRAINER_STATE, f"adapter/{WEIGHTS_NAME}", f"adapter/{CONFIG_NAME}"]
    missing = [name for name in required if name not in files]
    if missing or not any(name.startswith("engine/") for name in files):
        return f"{MANIFEST} lacks {missing or 'engine/ files'}"
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != info["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {info['size']}"
        if _sha256(file) != info["sha256"]:
            return f"{name} does not match its sha256"
    return None


def verify_checkpoint(path: str | Path) -> bool:
    """Whether `path` has a manifest and every file it lists has the recorded size and sha256."""
    return _manifest_problem(Path(path)) is None


# --- save --------------------------------------------------------------------------------------
def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint directories (never `.tmp-*`), newest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found, reverse=True)


def _publish(tmp: Path, final: Path, step: int, keep: int) -> None:
    """Rename the finished temp dir into place, point `latest` at it, then prune (rank 0)."""
    write_manifest(tmp)
    root = final.parent
    if final.exists():  # re-saving a step, e.g. after resuming from an earlier checkpoint
        stale = root / f"{TMP_PREFIX}replaced-{final.name}"
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / LATEST)
    _fsync(root)
    older = [p for s, p in _step_dirs(root) if s < step]
    for old in older[keep - 1 :]:
        shutil.rmtree(old)
    # Higher steps belong to a run that was rewound to an earlier checkpoint and went on from
    # there: left in place, they would win over this one whenever `latest` cannot be read.
    for s, superseded in _step_dirs(root):
        if s > step:
            logger.warning("removing %s: superseded by %s of the resumed run", superseded, final.name)
            shutil.rmtree(superseded)
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        logger.warning("removing %s, left by an interrupted save", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(
    engine: Any, model: nn.Module, output_dir: str | Path, step: int, trainer_state: dict[str, Any], keep: int = 2,
    save_weights: Callable[[nn.Module, Path], Any] = save_adapter,
) -> Path:
    """Save adapter, engine and trainer state under checkpoints/step-NNNNNN atomically; keep the last `keep`.

    save_weights writes the trainable layers into adapter/ (megaspec's; loop.Trainables for others).

    Collective: every rank must call it. Checkpoints of higher steps than `step` (left by a run
    that was resumed from an earlier one) are removed once this one is in place. `trainer_state` holds what the loop needs to resume
    (data position, config_hash, base_model, ...); step, method, world size, positions digest
    and every rank's RNG states are added here.
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be at least 1")
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is not None and checkpoint_engine.is_decoupled():
        # A decoupled (asynchronous) engine may still be writing when save_checkpoint returns:
        # the manifest would hash half-written files and the rename would publish them.
        raise ValueError("atomic checkpoints need DeepSpeed's synchronous checkpoint engine")
    root = Path(output_dir) / CHECKPOINTS
    tag = step_tag(step)
    tmp, final = root / f"{TMP_PREFIX}{tag}", root / tag
    last_good = read_latest(root)

    def guarded(fn: Callable[[], Any]) -> Callable[[], Any]:
        """fn, with a failed write (disk full, I/O error) turned into one WriteFailed line (issue 15)."""

        def run() -> Any:
            try:
                return fn()
            except Exception as exc:
                raise write_failed(exc, f"checkpoint {tag}", root, last_good) from exc

        return run

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    _on_rank0(guarded(prepare))
    # Collective under ZeRO-3. exclude_frozen_parameters: otherwise every rank also writes its
    # shard of the frozen base ("frozen_param_fragments"), i.e. the whole base model per save.
    # save_latest=True is harmless here (engine/latest names the one tag inside this checkpoint
    # and survives the rename) and needed: loading with load_optimizer_states=False or
    # load_module_only=True, and zero_to_fp32.py, find the tag only through that file.
    # A rank whose write fails raises at once: its peers wait in DeepSpeed's barrier until the
    # launcher (deepspeed, torchrun, srun --kill-on-bad-exit) ends them on this rank's exit 2.
    guarded(lambda: engine.save_checkpoint(str(tmp / "engine"), tag=tag, save_latest=True, exclude_frozen_parameters=True))()
    guarded(lambda: save_weights(model, tmp / "adapter"))()  # collective gather, rank 0 writes
    tensors, scalars = training_state.capture(engine)  # collective gathers; every rank gets them whole
    rngs = gather_to_rank0(rng_state())
    adapters = adapters_of(model)
    global_batch = int(engine.train_batch_size())
    state = {
        **trainer_state,
        **scalars,
        "format": FORMAT,
        "step": int(step),
        "engine_tag": tag,
        "world_size": world_size(),
        "global_batch": global_batch,
        "micro_batch": int(engine.train_micro_batch_size_per_gpu()),
        "accumulation": int(engine.gradient_accumulation_steps()),
        "global_samples": int(step) * global_batch,
        "method": next(iter(adapters.values())).config.method if adapters else None,
        "positions_digest": positions_digest(model),
    }

    def finish() -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / training_state.TENSORS))
        (tmp / TRAINER_STATE).write_text(json.dumps({**state, "rng": rngs}, indent=1))
        _publish(tmp, final, step, keep)

    _on_rank0(guarded(finish))
    return final


# --- find and load -----------------------------------------------------------------------------
def read_latest(root: Path) -> str | None:
    """The step tag `latest` names, or None when it is missing or not a step tag (garbage bytes, a torn write)."""
    try:
        text = (root / LATEST).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _STEP_DIR.fullmatch(text) else None


def scan_checkpoints(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from and every newer one rejected with its reason (rank 0).

    The one `latest` names comes first when it verifies; otherwise (missing, garbage, or naming
    a checkpoint that fails verification) the highest step that verifies.
    """
    candidates = [p for _, p in _step_dirs(root)]
    named = read_latest(root)
    if named is not None and root / named in candidates:
        candidates.remove(root / named)
        candidates.insert(0, root / named)
    rejected = []
    for path in candidates:
        problem = _manifest_problem(path)
        if problem is None:
            return path, rejected
        rejected.append((path, problem))
    return None, rejected


def _find_latest(root: Path) -> Path | None:
    """The checkpoint named by `latest` if it verifies, else the highest verifying step (rank 0)."""
    found, rejected = scan_checkpoints(root)
    for path, problem in rejected:
        logger.warning("skipping checkpoint %s: %s", path, problem)
    return found


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest verified checkpoint of a run (None if there is none); rank 0 decides for all ranks.

    Newest is the one `checkpoints/latest` names (the last completed save, also after a run
    was resumed from an earlier step); when it fails verification, the highest step that passes.
    """
    found = _on_rank0(lambda: _find_latest(Path(output_dir) / CHECKPOINTS))
    return None if found is None else Path(found)


class NothingToResume(ValueError):
    """--resume found no usable checkpoint; the message names what was found and why each was rejected."""


def resume_checkpoint(output_dir: str | Path) -> Path:
    """The checkpoint `--resume` continues from, or NothingToResume in one line; collective (rank 0 decides).

    Never guesses: a missing folder, a folder without checkpoints and a folder whose every
    checkpoint fails verification are all refused (issue 15: a silent fresh start would then
    prune the old checkpoints). Leftover `.tmp-*` saves of an interrupted run (a crash or a
    full disk) are removed here. Checkpoints newer than the one chosen are reported on stderr.
    """
    out = Path(output_dir)
    root = out / CHECKPOINTS

    def decide() -> Path:
        if not out.is_dir():
            raise NothingToResume(f"--resume: {out} does not exist, so there is nothing to resume; drop --resume to start a new run")
        steps = _step_dirs(root)
        if not steps:
            raise NothingToResume(
                f"--resume: {out} holds no checkpoint ({root} has no step-* folder); drop --resume to start a new "
                "run there (with --overwrite if it holds files of a run), or point --output_dir at the run to continue"
            )
        found, rejected = scan_checkpoints(root)
        reasons = "; ".join(f"{path.name}: {problem}" for path, problem in rejected)
        if found is None:
            raise NothingToResume(
                f"--resume: no usable checkpoint in {root} ({reasons}); nothing was changed: restore the files, or "
                "move the folder away and start a new run"
            )
        if rejected:
            print(f"train: warning: resuming from {found.name}, skipping newer checkpoints that fail verification "
                  f"({reasons})", file=sys.stderr, flush=True)
        for leftover in root.glob(f"{TMP_PREFIX}*"):
            logger.warning("removing %s, left by an interrupted save", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        return found

    return Path(_on_rank0(decide))


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer_state.json of the checkpoint at `path` (rank 0 reads, every rank gets it)."""
    return _on_rank0(lambda: json.loads((Path(path) / TRAINER_STATE).read_text()))


def load_checkpoint(engine: Any, path: str | Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the adapter values, optimizer state and step, LR schedule and RNG states; return the trainer state.

    Collective. Checks the manifest, the adapters' positions, that every key of `expected` (e.g.
    config_hash, base_model) has the saved value, and that the engine has the checkpoint's global
    batch (loop.setup fits it, megaspec.train.global_batch). The state is set by parameter name from
    training_state.safetensors, so any number of ranks may resume it; a checkpoint written before
    that file existed goes through DeepSpeed's loader, on as many ranks as wrote it.
    """
    path = Path(path)

    def check() -> dict[str, Any]:
        problem = _manifest_problem(path)
        if problem is not None:
            raise ValueError(f"checkpoint {path} failed verification: {problem}")
        return json.loads((path / TRAINER_STATE).read_text())

    state = _on_rank0(check)
    digest = positions_digest(engine.module)
    if state["positions_digest"] != digest:
        raise ValueError(f"the model's adapter positions (digest {digest[:12]}) differ from the checkpoint's at {path}")
    for key, value in (expected or {}).items():
        if state.get(key) != value:
            raise ValueError(f"{path} has {key}={state.get(key)!r}, this run has {value!r}")
    if state.get("format", 1) >= 2:
        if state["global_batch"] != engine.train_batch_size():
            raise ValueError(f"{path} trained with a global batch of {state['global_batch']} samples per update, "
                             f"this engine's is {engine.train_batch_size()}")
        tensors = _on_rank0(lambda: load_file(str(path / training_state.TENSORS)))
        training_state.restore(engine, tensors, state)
        engine.global_steps, engine.global_samples = int(state["step"]), int(state["global_samples"])
    else:
        _load_engine(engine, path, state)
    rngs = state.pop("rng")
    if rank() < len(rngs):
        set_rng_state(rngs[rank()])
    else:  # a rank the writer did not have: a state of its own, the same on every resume
        torch.manual_seed(int(hashlib.sha256(f"{state['step']}-{rank()}".encode()).hexdigest()[:15], 16))
    return state


def _load_engine(engine: Any, path: Path, state: dict[str, Any]) -> None:
    """DeepSpeed's own loader, for checkpoints without training_state.safetensors (per-rank partitions: same world size)."""
    if state["world_size"] != world_size():
        raise ValueError(
            f"{path} was saved by {ranks_word(state['world_size'])}, this run has {world_size()}, and it predates "
            f"rank-independent checkpoints: resume it with the same number of ranks"
        )
    # load_module_strict=False: the frozen base was excluded from the save; the adapter values
    # come back from the ZeRO optimizer's fp32 partitions, which are complete.
    loaded, _ = engine.load_checkpoint(str(path / "engine"), tag=state["engine_tag"], load_module_strict=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed found no engine state under {path / 'engine'} (tag {state['engine_tag']})")


# --- list --------------------------------------------------------------------------------------
def _describe(path: Path, latest: str | None) -> str:
    """One line about the checkpoint at `path`: step, loss, world size, global batch, and whether it verifies."""
    problem = _manifest_problem(path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        state = {}
    loss = state.get("loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, int | float) else "-"
    parts = [path.name, f"step {state.get('step', '-')}", f"loss {loss_text}", f"world size {state.get('world_size', '-')}",
             f"global batch {state.get('global_batch', '-')}"]
    if state and state.get("format", 1) < 2:
        world = state.get("world_size")
        parts.append(f"resumable on {world} rank{'' if world == 1 else 's'} only (no {training_state.TENSORS})")
    parts.append("verified" if problem is None else f"UNUSABLE: {problem}")
    if path.name == latest:
        parts.append("latest")
    return "  ".join(parts)


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """One line per checkpoint of the run at `run_dir`, oldest first; ValueError (one line) when there is none."""
    out = Path(run_dir)
    root = out / CHECKPOINTS
    if not out.is_dir():
        raise ValueError(f"--list_checkpoints: {out} does not exist")
    steps = _step_dirs(root)
    if not steps:
        raise ValueError(f"--list_checkpoints: {out} holds no checkpoint ({root} has no step-* folder)")
    latest = read_latest(root)
    return [_describe(path, latest) for _, path in reversed(steps)]
