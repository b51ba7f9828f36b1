"""Nothing lost, ever: --overwrite, --resume, stopped runs, a full disk, divergence and the LR each step used."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed import REPO, free_port
from tests.launcher import cpu_env, losses, metrics, run_train

FAST = ["--max_steps", "2", "--eval_every", "0", "--n_coeffs", "200"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]] | None:
    """Every path under `folder` with its size and mtime (None if the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], str]:
    """launch/train.py's main(argv) in this process: exit code, its `train: error:` lines, all of stderr."""
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    code = script.main(args)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("train: error: ")], err


def job_env(**extra: str) -> dict[str, str]:
    return cpu_env(**{"MASTER_PORT": str(free_port()), **extra})


# --- refused before anything is loaded (in-process) ---------------------------------------------
def test_overwrite_refuses_a_folder_that_is_not_a_run_and_touches_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "X"
    out.mkdir()
    (out / "precious.txt").write_text("k")
    before = snapshot(out)
    code, errors, err = run_main([*FAST, "--overwrite", "--output_dir", str(out)], capsys)
    assert code == 2 and len(errors) == 1, err
    assert "--overwrite refuses to delete" in errors[0] and "precious.txt" in errors[0], err
    assert snapshot(out) == before and (out / "precious.txt").read_text() == "k"


def test_overwrite_refuses_a_run_folder_holding_a_file_of_the_user(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "train_config.json").write_text("{}")
    (out / "notes.md").write_text("lr sweep, do not lose")
    before = snapshot(out)
    code, errors, err = run_main([*FAST, "--overwrite", "--output_dir", str(out)], capsys)
    assert code == 2 and len(errors) == 1 and "notes.md" in errors[0], err
    assert snapshot(out) == before


@pytest.mark.parametrize("layout", ["missing", "empty", "no_checkpoints"])
def test_resume_with_nothing_to_resume_is_refused(layout, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    if layout != "missing":
        out.mkdir()
    if layout == "no_checkpoints":
        (out / "metrics.jsonl").write_text("")
    before = snapshot(out)
    code, errors, err = run_main([*FAST, "--resume", "--output_dir", str(out)], capsys)
    assert code == 2 and len(errors) == 1, err
    expect = "does not exist, so there is nothing to resume" if layout == "missing" else "holds no checkpoint"
    assert expect in errors[0] and "drop --resume" in errors[0], err
    assert snapshot(out) == before


@contextlib.contextmanager
def read_only_folder(tmp_path: Path):
    """A folder nothing can be written in: chmod for a normal user; a read-only tmpfs for root (chmod does not bind it)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root, and no permission to mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("where", ["inside", "itself"])
def test_read_only_output_dir_is_refused_before_loading(where, tmp_path, capsys) -> None:
    with read_only_folder(tmp_path) as folder:
        out = folder / "run" if where == "inside" else folder
        code, errors, err = run_main([*FAST, "--output_dir", str(out)], capsys)
    assert code == 2 and len(errors) == 1 and "cannot be written" in errors[0], err
    assert "trainable of" not in err and "Traceback" not in err


# --- checkpoints: stopped runs, corrupt checkpoints, garbage `latest` ---------------------------
RUN = ["--max_steps", "6", "--save_every", "2", "--eval_every", "0", "--log_every", "1", "--image_every", "100",
       "--n_coeffs", "200"]


# Sends the process a SIGTERM while Python tears its modules down, as srun --kill-on-bad-exit does to a rank
# still exiting when another one has exited 75 (CI, stop 23: the job read 143, not 75).
SIGTERM_IN_TEARDOWN = """
import os, signal

class _TermAtTeardown:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)

_term_at_teardown = _TermAtTeardown()
"""


@pytest.fixture(scope="module")
def halted_run(tmp_path_factory) -> Path:
    """A 1-rank run stopped by --halt_at_step 4 (checkpoints at steps 2 and 4), as a signal would stop it.

    It also gets a SIGTERM while Python finalizes, which must not change its exit status.
    """
    out = tmp_path_factory.mktemp("halted") / "run"
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(SIGTERM_IN_TEARDOWN)
    env = job_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), env["PYTHONPATH"]])
    proc = run_train([*RUN, "--halt_at_step", "4", "--output_dir", str(out)], env=env)
    assert proc.returncode == 75, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "stopping at step 4" in proc.stdout
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
def test_a_stopped_run_exits_75_without_final_files(halted_run) -> None:
    assert not (halted_run / "adapter").exists() and not (halted_run / "final_metrics.json").exists()
    assert sorted(p.name for p in (halted_run / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert max(losses(halted_run)) == 4


@pytest.mark.slow
def test_each_step_logs_the_lr_its_update_used_and_none_is_zero(halted_run, tmp_path) -> None:
    """ssh's peak 2e-2; 6 steps: warmup max(1, 0.06 * 6) = 1, which DeepSpeed raises to 2; total_num_steps 7.

    Update k runs at WarmupDecayLR's iteration k: k/2 of the peak while k < 2, then (7 - k)/(7 - 2).
    """
    peak = 2e-2
    want = {k: peak * (k / 2 if k < 2 else (7 - k) / 5) for k in range(1, 7)}
    out = copy_run(halted_run, tmp_path)
    proc = run_train([*RUN, "--resume", "--output_dir", str(out)], env=job_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["step"]: r["lr"] for r in metrics(out)}
    assert got == pytest.approx(want, rel=1e-9)
    assert min(got.values()) > 0


@pytest.mark.slow
def test_a_finished_run_is_not_resumed_again_and_is_left_as_it_was(halted_run, tmp_path, capsys) -> None:
    """Stopped after its last checkpoint, a run resumes to write its final files (the checkpoint's loss); then it is done."""
    out = copy_run(halted_run, tmp_path)
    proc = run_train([*RUN, "--max_steps", "4", "--resume", "--output_dir", str(out)], env=job_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    step4 = [r for r in metrics(out) if r["step"] == 4][0]
    assert final["step"] == 4 and final["loss"] == step4["loss"] and (out / "adapter").is_dir()
    before = snapshot(out)
    code, errors, _ = run_main([*RUN, "--max_steps", "4", "--resume", "--output_dir", str(out)], capsys)
    assert code == 2 and errors == [f"train: error: --resume: the run in {out} already finished at step 4 (--max_steps 4); "
                                    "raise --max_steps to train it further, or pass a new --output_dir"]
    code, errors, _ = run_main([*RUN, "--max_steps", "3", "--resume", "--output_dir", str(out)], capsys)
    assert code == 2 and errors == [f"train: error: --resume: the checkpoint in {out} is at step 4, past --max_steps 3; "
                                    "pass --max_steps 4 or more"]
    assert snapshot(out) == before


@pytest.mark.slow
def test_garbage_latest_falls_back_to_the_step_folders_and_the_resumed_run_finishes(halted_run, tmp_path, capsys) -> None:
    from megaspec.config import AdapterConfig
    from megaspec.train.checkpoint import resume_checkpoint
    from megaspec.train.config import TrainConfig
    from megaspec.train.validate import check_output_dir

    out = copy_run(halted_run, tmp_path)
    (out / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00\x13garbage\x80")
    check_output_dir(TrainConfig(resume=True, output_dir=str(out), adapter=AdapterConfig(n_coeffs=200)))
    assert resume_checkpoint(out) == out / "checkpoints" / "step-000004"
    proc = run_train([*RUN, "--resume", "--output_dir", str(out)], env=job_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-000004'} at step 4" in proc.stdout
    assert json.loads((out / "final_metrics.json").read_text())["step"] == 6 and (out / "adapter").is_dir()


@pytest.mark.slow
def test_a_corrupt_newer_checkpoint_is_skipped_with_a_warning(halted_run, tmp_path, capsys) -> None:
    from megaspec.train.checkpoint import resume_checkpoint

    out = copy_run(halted_run, tmp_path)
    damage(out / "checkpoints" / "step-000004")
    assert resume_checkpoint(out) == out / "checkpoints" / "step-000002"
    warning = capsys.readouterr().err
    assert "resuming from step-000002" in warning and "step-000004: adapter/adapter_model.safetensors" in warning
    assert (out / "checkpoints" / "step-000004").is_dir()  # reported, not deleted


def damage(checkpoint: Path) -> None:
    """Flip one byte of the checkpoint's adapter weights (its manifest no longer matches)."""
    weights = checkpoint / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.mark.slow
def test_resume_with_every_checkpoint_corrupt_refuses_and_deletes_nothing(halted_run, tmp_path) -> None:
    out = copy_run(halted_run, tmp_path)
    for checkpoint in (out / "checkpoints").glob("step-*"):
        damage(checkpoint)
    before = snapshot(out)
    proc = run_train([*RUN, "--resume", "--output_dir", str(out)], env=job_env())
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "no usable checkpoint" in errors[0]
    assert "step-000004: adapter/adapter_model.safetensors does not match its sha256" in errors[0]
    assert "step-000002: adapter/adapter_model.safetensors does not match its sha256" in errors[0]
    assert "Traceback" not in proc.stderr and "trainable of" not in proc.stdout
    assert snapshot(out) == before


# --- a full disk --------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (skips when this machine does not let the test mount one)."""
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("no permission to mount a tmpfs (needs root or CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file until only about `leave` bytes are free on `disk`."""
    filler = disk / "filler.bin"
    free = shutil.disk_usage(disk).free - leave
    with open(filler, "wb") as f:
        block = b"\0" * (1 << 16)
        with contextlib.suppress(OSError):
            while free > 0:
                f.write(block[: min(len(block), free)])
                free -= len(block)
    return filler


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_keeps_the_last_checkpoint_and_resume_cleans_up(tmp_path) -> None:
    from megaspec.train.checkpoint import latest_checkpoint, verify_checkpoint

    with small_disk(tmp_path / "disk", "16m") as disk:
        out = disk / "run"
        args = [*RUN, "--log_every", "100", "--output_dir", str(out)]
        first = run_train([*args, "--halt_at_step", "2"], env=job_env())
        assert first.returncode == 75, first.stderr[-3000:]
        filler = fill(disk, leave=96 << 10)  # room for logs, not for a checkpoint (~270 kB here)
        full = run_train([*args, "--resume"], env=job_env())
        errors = [line for line in full.stderr.splitlines() if line.startswith("train: error: ")]
        assert full.returncode == 2 and len(errors) == 1, full.stderr[-3000:]
        assert "no space left on device" in errors[0] and "step-000002 is untouched" in errors[0], errors[0]
        assert "Traceback" not in full.stderr
        kept = latest_checkpoint(out)
        assert kept is not None and kept.name == "step-000002" and verify_checkpoint(kept)
        assert not (out / "adapter").exists() and not (out / "final_metrics.json").exists()
        filler.unlink()
        again = run_train([*args, "--resume"], env=job_env())
        assert again.returncode == 0, again.stderr[-3000:]
        assert not list((out / "checkpoints").glob(".tmp-*"))
        assert json.loads((out / "final_metrics.json").read_text())["step"] == 6


def test_write_failures_name_the_disk_and_the_checkpoint_left_intact(tmp_path) -> None:
    import errno

    from megaspec.train.errors import out_of_space, write_failed

    full = write_failed(OSError(errno.ENOSPC, "No space left on device"), "checkpoint step-000004", tmp_path, "step-000002")
    assert str(full).startswith(f"no space left on device writing checkpoint step-000004 under {tmp_path}")
    assert "step-000002 is untouched" in str(full) and "--resume" in str(full)
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1460")
    assert out_of_space(torn)
    other = write_failed(PermissionError(errno.EACCES, "Permission denied"), "metrics.jsonl", tmp_path, None)
    assert "PermissionError" in str(other) and "--overwrite" in str(other)


# --- divergence -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_divergence_ends_with_exit_3_and_one_line_and_keeps_checkpoints(tmp_path) -> None:
    """--lr 1e30: coefficients of ~1e30 after one update, then non-finite losses; logging must not crash first."""
    from megaspec.train.checkpoint import latest_checkpoint, verify_checkpoint

    out = tmp_path / "run"
    proc = run_train([*RUN, "--lr", "1e30", "--save_every", "1", "--max_skipped_steps", "2", "--output_dir", str(out)],
                     ranks=2, env=job_env())
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error: ")]
    assert proc.returncode == 3 and len(errors) == 1, proc.stderr[-3000:]
    assert "gradient norm is exactly 0" in errors[0] and "--max_skipped_steps 2" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    kept = latest_checkpoint(out)
    assert kept is not None and verify_checkpoint(kept)
    assert not (out / "adapter").exists() and not (out / "final_metrics.json").exists()


def test_non_finite_parameters_are_found_on_any_rank_partition() -> None:
    import torch

    from megaspec.train.guard import coefficients_finite

    good = torch.nn.Parameter(torch.ones(4))
    assert coefficients_finite([good])
    bad = torch.nn.Parameter(torch.tensor([1.0, math.inf]))
    assert not coefficients_finite([good, bad])
    partitioned = torch.nn.Parameter(torch.empty(0))  # a ZeRO-3 parameter: its data is empty, its partition is not
    partitioned.ds_tensor = torch.tensor([float("nan")])
    assert not coefficients_finite([good, partitioned])


def test_histograms_skip_non_finite_values_and_logging_failures_do_not_end_the_run(tiny_model, tmp_path, capsys) -> None:
    import torch

    import megaspec
    from megaspec.train.monitor import RunLogger

    megaspec.apply_adapters(tiny_model, megaspec.AdapterConfig(method="fourierft", n_coeffs=16))
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.requires_grad:
                p.fill_(float("nan"))  # what a diverged run holds: TensorBoard's histogram fails on it
    log = RunLogger(tmp_path)
    stats = log.log_spectral(1, tiny_model)
    assert stats and all(math.isnan(v) for v in stats.values())

    def broken(*args, **kwargs):
        raise ValueError("The histogram is empty, please file a bug report.")

    log.writer.add_histogram = broken
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.requires_grad:
                p.fill_(1.0)
    log.log_spectral(2, tiny_model)
    log.log_spectral(3, tiny_model)
    log.log_scalars(3, {"loss": 1.0})
    log.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard histogram" in line]
    assert len(warnings) == 1 and "at step 2" in warnings[0] and "training goes on" in warnings[0], warnings
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3]


# --- heartbeat --------------------------------------------------------------------------------------
def test_heartbeat_reports_a_long_phase_once_per_period_and_restarts_with_a_new_phase() -> None:
    from megaspec.train.heartbeat import Heartbeat

    stream = io.StringIO()
    beat = Heartbeat(after=0.3, rank=1, stream=stream, world=2)
    beat.phase("step 7 (forward, backward, optimizer)")
    time.sleep(0.75)
    beat.phase("checkpoint of step 7")
    time.sleep(0.1)
    beat.stop()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("train: heartbeat: rank 1 still in step 7 (forward, backward, optimizer) after") for line in lines)
    assert "MEGASPEC_DIST_TIMEOUT_S=" in lines[0]


def test_void_updates_count_toward_divergence_like_skipped_steps() -> None:
    from megaspec.train.guard import NonFiniteGuard

    guard = NonFiniteGuard(limit=2)
    guard.end_step(skipped=False, grad_norm=3.5)
    guard.end_step(skipped=False, grad_norm=0.0)
    guard.end_step(skipped=True)
    assert guard.streak == 2 and not guard.diverged() and guard.skipped == 1
    guard.end_step(skipped=False, grad_norm=math.inf)
    assert guard.diverged()
    message = guard.message(4)
    assert message.startswith("gradient norm is exactly 0 (the loss no longer depends on the adapter) and loss is not "
                              "finite and gradient norm is not finite at step 4: 3 steps in a row (from step 2)"), message
    guard.end_step(skipped=False, grad_norm=None)  # a config that does not compute the norm: nothing to judge
    assert guard.streak == 0 and not guard.diverged()


def test_a_single_rank_heartbeat_does_not_speak_of_peers() -> None:
    from megaspec.train.heartbeat import Heartbeat

    stream = io.StringIO()
    beat = Heartbeat(after=0.2, rank=0, stream=stream, world=1)
    beat.phase("eval at step 50")
    time.sleep(0.35)
    beat.stop()
    assert stream.getvalue().splitlines() == ["train: heartbeat: rank 0 still in eval at step 50 after 0 s"]


@pytest.mark.slow
def test_a_rendezvous_port_in_use_is_one_line(tmp_path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**cpu_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *FAST, "--output_dir", str(tmp_path / "run")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"127.0.0.1:{port} is already in use" in errors[0] and "--master_port" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
