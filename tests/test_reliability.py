"""Reliability of launch/train.py: bad input fails fast with one line, faults never hang or lose a checkpoint."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.distributed import REPO, free_port
from tests.launcher import check, cpu_env, losses, metrics, remove_shm_buffers, run_train, train_command

ZERO3 = REPO / "ds_configs" / "zero3.json"


def job_env(**extra: str) -> dict[str, str]:
    """cpu_env with a MASTER_PORT of the job's own."""
    # cpu_env keeps this process's MASTER_PORT, which an in-process test world (test_checkpoint) sets and
    # holds: a 1-process job inheriting it fails to bind it (EADDRINUSE) when the whole suite runs
    return cpu_env(**{"MASTER_PORT": str(free_port()), **extra})

FAST = ["--max_steps", "2", "--eval_every", "0", "--n_coeffs", "200"]  # if a bad input slipped through, a short run


# --- bad input: one table -----------------------------------------------------------------------------------
# Each case runs launch/train.py's main(argv) as the command line does. Cases marked `process` run as a real
# 1-process job (run_train), all started at once; the others call main(argv) in this process, which is the
# same code path for input that validation refuses (it returns 2 before any process group exists) and costs
# a fraction of a second instead of a fresh interpreter's imports.
@dataclasses.dataclass(frozen=True)
class Case:
    """A bad command line: what stderr must say; whether --output_dir exists beforehand (then with --overwrite)."""

    id: str
    args: Callable[[Path], list[str]]  # workspace -> arguments (--output_dir is added)
    expect: str
    existing: bool = False
    overwrite: bool = True  # with an existing folder: pass --overwrite, so only validation stands between it and rmtree
    process: bool = False  # run as a separate `python launch/train.py` process
    env: Callable[[Path], dict[str, str]] = lambda ws: {}
    in_loop: bool = False  # found by the loop after model loading (still before the folder is touched)


def ds(name: str) -> Callable[[Path], list[str]]:
    """Arguments pointing --ds_config at one of the workspace's broken configs."""
    return lambda ws: ["--ds_config", str(ws / "ds" / name)]


CASES = [
    Case("ds_config_missing", ds("missing.json"), "missing.json does not exist", process=True),
    Case("ds_config_not_json", ds("broken.json"), "is not valid JSON", existing=True),
    Case("ds_config_top_level_typo", ds("top_typo.json"), "did you mean 'train_micro_batch_size_per_gpu'"),
    Case("ds_config_zero_key_typo", ds("zero_typo.json"), "did you mean 'stage3_prefetch_bucket_size'", existing=True),
    Case("ds_config_bad_zero_stage", ds("stage7.json"), "zero_optimization.stage"),
    Case("ds_config_batch_mismatch", ds("batch7.json"), "train_batch_size", existing=True),
    Case("ds_config_unknown_optimizer", ds("optimizer.json"), "unknown optimizer type 'AdamQ'"),
    Case("unknown_method", lambda ws: ["--method", "sshh"], "unknown method 'sshh'", existing=True),
    Case("unknown_tracker", lambda ws: ["--report_to", "tensorboard,comet"], "unknown tracker 'comet'"),
    Case("targets_match_nothing", lambda ws: ["--target_modules", "qq_proj"], "match no linear layer"),
    Case("n_coeffs_zero", lambda ws: ["--n_coeffs", "0"], "--n_coeffs 0 must be at least 1", existing=True),
    Case("n_coeffs_beyond_layer", lambda ws: ["--method", "fourierft", "--n_coeffs", "5000"], "--n_coeffs 5000 must be in 1..2048"),
    Case("max_steps_zero", lambda ws: ["--max_steps", "0"], "--max_steps 0 must be at least 1", existing=True),
    Case("model_missing", lambda ws: ["--model", str(ws / "no_model")], "no_model does not exist"),
    Case("tokenizer_larger_than_vocab", lambda ws: ["--model", str(ws / "vocab100")], "vocab_size is 100", existing=True),
    Case("seq_len_beyond_positions", lambda ws: ["--seq_len", "512"], "max_position_embeddings 256"),
    Case("dataset_missing", lambda ws: ["--dataset", str(ws / "none.jsonl")], "none.jsonl does not exist", existing=True),
    Case("dataset_without_fields", lambda ws: ["--dataset", str(ws / "qa.jsonl")], "has fields ['answer', 'question']"),
    Case("dataset_empty_after_filtering", lambda ws: ["--dataset", str(ws / "blank.jsonl")], "has no record with",
         existing=True, in_loop=True, process=True),
    Case("quantize_without_bitsandbytes", lambda ws: ["--quantize", "nf4"], "--quantize nf4: bitsandbytes cannot run",
         env=lambda ws: {"PYTHONPATH": f"{ws / 'no_bnb'}{os.pathsep}{REPO}"}, process=True),
    Case("output_dir_holds_a_run", lambda ws: [], "already holds a run; pass --resume", existing=True, overwrite=False,
         process=True),
    Case("resume_other_method", lambda ws: ["--resume", "--method", "lora"], "has method='ssh' but this run has method='lora'",
         existing=True, overwrite=False),
    Case("resume_global_batch_unsplittable", lambda ws: ["--resume"], "global batch of 6 samples per update cannot be "
         "split over 1 rank with micro-batch 4; use train_micro_batch_size_per_gpu 6, 3, 2 or 1 in --ds_config",
         existing=True, overwrite=False),
    Case("resume_old_checkpoint_other_world_size", lambda ws: ["--resume"], "saved by 2 ranks, this run has 1, and it predates",
         existing=True, overwrite=False),
]


def write_workspace(ws: Path) -> None:
    """The files the bad cases point at: broken DeepSpeed configs, a model folder, datasets, a fake bitsandbytes."""
    (ws / "ds").mkdir(parents=True)
    good = json.loads(ZERO3.read_text())

    def variant(name: str, change: Callable[[dict], None]) -> None:
        config = json.loads(json.dumps(good))
        change(config)
        (ws / "ds" / name).write_text(json.dumps(config))

    (ws / "ds" / "broken.json").write_text('{"train_micro_batch_size_per_gpu": 4,,}')
    variant("top_typo.json", lambda c: c.update(train_micro_batch_size_per_gpus=c.pop("train_micro_batch_size_per_gpu")))
    variant("zero_typo.json", lambda c: c["zero_optimization"].update(stage3_prefetch_bucket_sizee=1000))
    variant("stage7.json", lambda c: c["zero_optimization"].update(stage=7))
    variant("batch7.json", lambda c: c.update(train_batch_size=7))
    variant("optimizer.json", lambda c: c["optimizer"].update(type="AdamQ"))

    from megaspec.train.embedded import embedded_tokenizer, tiny_llama_config

    model = ws / "vocab100"  # config.json and tokenizer only: validation never needs the weights
    embedded_tokenizer().save_pretrained(model)
    tiny_llama_config(100).to_json_file(model / "config.json")

    (ws / "qa.jsonl").write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(20)))
    (ws / "blank.jsonl").write_text("\n".join(json.dumps({"text": "   "}) for _ in range(20)))
    (ws / "no_bnb" / "bitsandbytes").mkdir(parents=True)
    (ws / "no_bnb" / "bitsandbytes" / "__init__.py").write_text('raise ImportError("no native library for this device")\n')


def write_saved_run(out: Path, world_size: int, global_batch: int | None = None) -> None:
    """A run folder as the loop leaves it (ssh, default settings), without the heavy engine files.

    With `global_batch`, its checkpoint has a rank-independent training state (format 2) of that many
    samples per update, written by `world_size` ranks with no accumulation.
    """
    from megaspec.config import AdapterConfig
    from megaspec.train.checkpoint import config_hash
    from megaspec.train.config import TrainConfig, resume_keys, run_record

    cfg = TrainConfig(adapter=AdapterConfig(method="ssh", n_coeffs=200), output_dir=str(out))
    state = {"config_hash": config_hash(resume_keys(cfg, former=True)), "step": 2, "world_size": world_size, "method": "ssh"}
    if global_batch is not None:
        state.update(format=2, global_batch=global_batch, micro_batch=global_batch // world_size, accumulation=1)
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "trainer_state.json").write_text(json.dumps(state))
    (out / "checkpoints" / "latest").write_text("step-000002")
    (out / "train_config.json").write_text(json.dumps(run_record(cfg, None)))


def snapshot(folder: Path) -> dict[str, tuple[int, int]] | None:
    """Every path under `folder` with its size and mtime (None if the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def prepare(case: Case, ws: Path) -> tuple[list[str], Path]:
    """The case's arguments, with its output folder made (and filled) beforehand when the case says so."""
    out = ws / "runs" / case.id
    if case.existing:
        out.mkdir(parents=True)
        # a previous run lives here: --overwrite may replace it (a folder holding other files is refused
        # outright, tests/test_no_data_loss.py), so only validation stands between it and rmtree
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
        if case.id.startswith("resume_"):
            batch = 6 if "global_batch" in case.id else None
            write_saved_run(out, world_size=2 if "world_size" in case.id or batch else 1, global_batch=batch)
    args = [*FAST, *case.args(ws), "--output_dir", str(out)]
    if case.existing and case.overwrite:
        args.append("--overwrite")
    return args, out


def run_process_case(case: Case, ws: Path) -> tuple[subprocess.CompletedProcess, dict | None, dict | None, float]:
    """Run one bad command line as a process; the output folder's snapshot before and after, and the seconds it took."""
    args, out = prepare(case, ws)
    before = snapshot(out)
    start = time.monotonic()
    proc = run_train(args, ranks=1, timeout=240, env=job_env(**case.env(ws)))
    return proc, before, snapshot(out), time.monotonic() - start


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with every file the bad cases point at."""
    ws = tmp_path_factory.mktemp("bad_input")
    write_workspace(ws)
    return ws


@pytest.fixture(scope="module")
def process_runs(request, workspace) -> dict[str, Future]:
    """Start every selected process case at once (they are mostly imports); futures by case id."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {c.id: pool.submit(run_process_case, c, workspace) for c in CASES if c.process and c.id in selected}
    yield futures
    pool.shutdown(wait=True)


def run_in_process(case: Case, ws: Path, capsys: pytest.CaptureFixture) -> tuple[subprocess.CompletedProcess, dict | None, dict | None, float]:
    """Call launch/train.py's main(argv) here, as `python launch/train.py ARGS` would."""
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args, out = prepare(case, ws)
    before = snapshot(out)
    capsys.readouterr()
    joined = torch_distributed_initialized()  # other test modules may have made a world of one already
    start = time.monotonic()
    code = script.main(args)
    seconds = time.monotonic() - start
    assert torch_distributed_initialized() == joined, "validation must fail before torch.distributed starts"
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err), before, snapshot(out), seconds


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_fast_with_one_line_and_leaves_output_dir_alone(case: Case, workspace, process_runs, capsys) -> None:
    if case.process:
        proc, before, after, seconds = process_runs[case.id].result()
    else:
        proc, before, after, seconds = run_in_process(case, workspace, capsys)
    report = f"exit {proc.returncode} after {seconds:.0f}s\n--- stderr\n{proc.stderr[-3000:]}\n--- stdout\n{proc.stdout[-1500:]}"
    assert proc.returncode == 2, report
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error: ")]
    assert len(errors) == 1 and case.expect in errors[0], report
    assert "Traceback" not in proc.stderr, report
    assert after == before, f"output_dir changed: {before} -> {after}"
    if not case.in_loop:  # refused by validation: the model was never loaded nor the process group formed
        assert "trainable of" not in proc.stdout and "resumed from" not in proc.stdout, report


def torch_distributed_initialized() -> bool:
    """Whether this process has joined a torch.distributed world."""
    import torch.distributed as torch_dist

    return torch_dist.is_available() and torch_dist.is_initialized()


def test_check_quantize_runs_each_mode_here_and_names_a_missing_library(monkeypatch) -> None:
    """bitsandbytes runs on this CPU; without it, --quantize fails with one line naming the fix."""
    import sys

    from megaspec.train.dsconfig import ConfigError
    from megaspec.train.validate import check_quantize

    for mode in ("nf4", "fp4", "int8"):
        check_quantize(mode, "cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ConfigError, match="--quantize nf4: bitsandbytes cannot run on cpu"):
        check_quantize("nf4", "cpu")


def test_valid_defaults_pass_validation_and_unknown_ds_keys_only_warn(tmp_path) -> None:
    """The README command validates cleanly; a key DeepSpeed does not know, and nothing like a known one, warns."""
    from megaspec.train.config import TrainConfig
    from megaspec.train.validate import validate

    config = json.loads(ZERO3.read_text())
    config["my_own_notes"] = "tuned on 8 GPUs"
    (tmp_path / "ds.json").write_text(json.dumps(config))
    assert validate(TrainConfig(ds_config=str(ZERO3))) == []
    (warning,) = validate(TrainConfig(ds_config=str(tmp_path / "ds.json"), output_dir=str(tmp_path / "run")))
    assert "'my_own_notes'" in warning and "ignore" in warning
    assert not (tmp_path / "run").exists()


# --- faults (real runs) ------------------------------------------------------------------------------------
STEPS = 20
RUN = ["--max_steps", str(STEPS), "--n_coeffs", "200", "--eval_every", "0", "--save_every", "1", "--image_every", "100"]


def start(args: list[str], logs: Path, ranks: int = 1, **env: str) -> tuple[subprocess.Popen, list[str]]:
    """Start a training job in its own process group, its output in logs/stdout and logs/stderr (files: never blocks)."""
    command = train_command(args, ranks)
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=job_env(**env), stdout=out, stderr=err, start_new_session=True)
    return proc, command


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until `predicate` holds; fail if the job ends first or it takes too long."""
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"job ended early with exit code {proc.returncode}"
        assert time.monotonic() < end, "timed out waiting for the job"
        time.sleep(0.02)


def logged_steps(out: Path) -> int:
    """How many steps the run has logged to metrics.jsonl so far."""
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's /dev/shm all-reduce buffers of the job on `port` that are still there."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of a job's process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted 1-rank reference run."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    check(run_train([*RUN, "--output_dir", str(out)], ranks=1, env=job_env()))
    return out


def adapter_coeffs(run: Path) -> dict:
    """The final adapter's trained coefficients by name."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(run / "adapter" / "adapter_model.safetensors")).items() if k.endswith(".coeffs")}


def assert_same_run(run: Path, reference: Path, steps: range) -> None:
    """Losses at `steps` and the final coefficients agree with the reference run."""
    import torch

    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in steps:
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    for key, value in adapter_coeffs(run).items():
        torch.testing.assert_close(value, adapter_coeffs(reference)[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches_uninterrupted_run(straight_run, tmp_path) -> None:
    out = tmp_path / "preempted"
    proc, _ = start([*RUN, "--output_dir", str(out)], tmp_path / "logs")
    try:
        wait_for(lambda: logged_steps(out) >= 3, proc)
        proc.send_signal(signal.SIGTERM)  # what SLURM sends before preempting
        proc.wait(timeout=120)
    finally:
        kill_group(proc)
    stdout, stderr = (tmp_path / "logs" / "stdout").read_text(), (tmp_path / "logs" / "stderr").read_text()
    assert proc.returncode == 75, stderr[-3000:]  # stopped with a checkpoint: resume later (README "Troubleshooting")
    assert "stopping at step" in stdout and "signal SIGTERM" in stdout
    assert not (out / "adapter").exists() and not (out / "final_metrics.json").exists()
    stopped = max(losses(out))
    assert 3 <= stopped < STEPS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:06d}"
    # same seed, same config: the first run's steps are the reference's, bit for bit
    assert [losses(out)[s] for s in range(1, stopped + 1)] == [losses(straight_run)[s] for s in range(1, stopped + 1)]
    proc = check(run_train([*RUN, "--output_dir", str(out), "--resume"], ranks=1, env=job_env()))
    assert f"at step {stopped}" in proc.stdout
    assert_same_run(out, straight_run, range(stopped + 1, STEPS + 1))


@pytest.mark.slow
def test_sigterm_to_a_two_rank_job_writes_a_verified_checkpoint(tmp_path) -> None:
    from megaspec.train.checkpoint import latest_checkpoint, verify_checkpoint

    out = tmp_path / "preempted2"
    proc, command = start([*RUN, "--max_steps", "500", "--save_every", "1000", "--output_dir", str(out)], tmp_path / "logs",
                          ranks=2)
    try:
        wait_for(lambda: logged_steps(out) >= 2, proc)
        os.killpg(proc.pid, signal.SIGTERM)  # SLURM signals every process of the job step
        signalled = time.monotonic()
        proc.wait(timeout=30)  # the `deepspeed` runner dies at once (reaped here: a zombie stays in the group)
        while time.monotonic() - signalled < 60:  # wait for the launcher and the ranks
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        seconds = time.monotonic() - signalled
        leftovers = shm_buffers(int(command[command.index("--master_port") + 1]))
    finally:
        kill_group(proc)
        remove_shm_buffers(int(command[command.index("--master_port") + 1]))
    print(f"2-rank job gone {seconds:.1f}s after SIGTERM")
    assert leftovers == [], "the ranks unlink their /dev/shm buffers once the process group has formed"
    assert seconds < 30, "the ranks must finish their checkpoint within the launcher's 30 s grace"
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and verify_checkpoint(ckpt)
    assert ckpt.name == f"step-{max(losses(out)):06d}"  # the step the ranks agreed to stop at
    assert "stopping at step" in (tmp_path / "logs" / "stdout").read_text()


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_command_alone_stops_the_ranks_with_a_checkpoint(tmp_path) -> None:
    """`kill PID` of `deepspeed` (or `timeout`): its single-node runner dies without passing the signal on.

    The ranks see their launcher go, checkpoint and exit instead of training on as orphans.
    """
    import psutil

    from megaspec.train.checkpoint import latest_checkpoint, verify_checkpoint

    out = tmp_path / "orphaned"
    proc, command = start([*RUN, "--max_steps", "500", "--save_every", "1000", "--output_dir", str(out)], tmp_path / "logs",
                          ranks=2)
    try:
        wait_for(lambda: logged_steps(out) >= 2, proc)
        job = psutil.Process(proc.pid).children(recursive=True)
        assert len(job) == 3  # launch.py and two ranks
        proc.send_signal(signal.SIGTERM)  # the runner only, as `kill PID` does
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(job, timeout=90)
        leftovers = shm_buffers(int(command[command.index("--master_port") + 1]))
    finally:
        kill_group(proc)
        remove_shm_buffers(int(command[command.index("--master_port") + 1]))
    assert alive == [], f"still running after their launcher died: {[p.cmdline()[-6:] for p in alive]}"
    assert leftovers == []
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and verify_checkpoint(ckpt)
    assert ckpt.name == f"step-{max(losses(out)):06d}"
    # rank 0 names what it saw, or what another rank saw first (each rank watches its own launcher)
    stopped = re.findall(r"stopping at step \d+ \((.*)\): checkpoint written", (tmp_path / "logs" / "stdout").read_text())
    assert stopped in ([f"the deepspeed command (pid {proc.pid}) exited"], ["the deepspeed launcher exited (seen first by "
                                                                             "another rank)"]), stopped


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(straight_run, tmp_path) -> None:
    from megaspec.train.checkpoint import CHECKPOINTS, latest_checkpoint, verify_checkpoint

    out = tmp_path / "crashed"
    root = out / CHECKPOINTS
    proc, _ = start([*RUN, "--output_dir", str(out)], tmp_path / "logs")
    try:
        frozen = None
        while frozen is None:  # freeze the job in the middle of a save (a .tmp-step dir exists), then kill it
            wait_for(lambda: any(root.glob(".tmp-step-*")) and (root / "latest").exists(), proc)
            os.killpg(proc.pid, signal.SIGSTOP)
            frozen = next(iter(root.glob(".tmp-step-*")), None)
            if frozen is None:
                os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
    interrupted = int(frozen.name.rsplit("-", 1)[1])
    previous = latest_checkpoint(out)
    assert previous is not None and verify_checkpoint(previous)
    assert int(previous.name.rsplit("-", 1)[1]) == interrupted - 1
    proc = check(run_train([*RUN, "--output_dir", str(out), "--resume"], ranks=1, env=job_env()))
    assert f"resumed from {previous} at step {interrupted - 1}" in proc.stdout
    assert not list(root.glob(".tmp-*"))
    assert_same_run(out, straight_run, range(interrupted, STEPS + 1))


@pytest.mark.slow
def test_killed_rank_ends_the_whole_job_quickly(tmp_path) -> None:
    import psutil

    out = tmp_path / "killed"
    proc, command = start([*RUN, "--max_steps", "500", "--save_every", "1000", "--output_dir", str(out)], tmp_path / "logs",
                          ranks=2, MEGASPEC_DIST_TIMEOUT_S="60")
    try:
        wait_for(lambda: logged_steps(out) >= 2, proc)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]
        assert len(ranks) == 1
        ranks[0].kill()
        killed = time.monotonic()
        proc.wait(timeout=90)
        seconds = time.monotonic() - killed
        leftovers = shm_buffers(int(command[command.index("--master_port") + 1]))
    finally:
        kill_group(proc)
        remove_shm_buffers(int(command[command.index("--master_port") + 1]))
    print(f"job exited with {proc.returncode} {seconds:.1f}s after rank 1 was killed")
    assert proc.returncode != 0
    assert seconds < 60, f"the job took {seconds:.0f}s to end after a rank died"
    assert leftovers == [], "a SIGKILL leaves no /dev/shm buffer: they were unlinked once the process group formed"


@pytest.mark.slow
def test_hung_rank_times_out_instead_of_hanging(tmp_path) -> None:
    import psutil

    out = tmp_path / "hung"
    proc, command = start([*RUN, "--max_steps", "500", "--save_every", "1000", "--output_dir", str(out)], tmp_path / "logs",
                          ranks=2, MEGASPEC_DIST_TIMEOUT_S="15", MEGASPEC_HEARTBEAT_S="4")
    try:
        wait_for(lambda: logged_steps(out) >= 2, proc)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]
        ranks[0].suspend()  # alive but stuck: only a collective timeout can end the job
        stopped = time.monotonic()
        proc.wait(timeout=120)
        seconds = time.monotonic() - stopped
        leftovers = shm_buffers(int(command[command.index("--master_port") + 1]))
    finally:
        kill_group(proc)
        remove_shm_buffers(int(command[command.index("--master_port") + 1]))
    print(f"job exited with {proc.returncode} {seconds:.1f}s after rank 1 was suspended")
    assert proc.returncode != 0
    assert seconds < 90, f"the job took {seconds:.0f}s to end after a rank hung"
    # the rank still alive says where it waits, while it waits (issue 15): in the step's collectives,
    # or in the logging's gather of the adapters (log_every 1), depending on where rank 1 stopped
    beats = re.findall(r"train: heartbeat: rank 0 still in (step \d+|logging step \d+)\b.* after (\d+) s",
                       (tmp_path / "logs" / "stderr").read_text())
    assert beats and int(beats[0][1]) >= 4, "rank 0 printed no heartbeat while it waited for the hung rank"
    assert leftovers == [], "the ranks unlink their /dev/shm buffers once the process group has formed"


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """2 ranks; rank 0 alone sees NaN at step 4 (skipped), then at 7, 8, 9 (one more than allowed: stop)."""
    out = tmp_path_factory.mktemp("nan") / "run"
    args = [*RUN, "--save_every", "5", "--log_every", "1", "--max_skipped_steps", "2", "--output_dir", str(out)]
    proc = run_train(["4,7,8,9", *args], ranks=2, env=job_env(), script=REPO / "tests" / "nan_train.py")
    return out, proc


def global_norms(run: Path) -> dict[int, float]:
    """step -> norm of all adapter coefficients, as TensorBoard recorded it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("spectral/global_norm")}


@pytest.mark.slow
def test_nan_loss_step_is_skipped_and_logged(nan_run) -> None:
    out, _ = nan_run
    records = {r["step"]: r for r in metrics(out)}
    assert math.isnan(records[4]["loss"]) and math.isfinite(records[5]["loss"])
    assert [records[s]["skipped_steps"] for s in (3, 4, 5, 6)] == [0, 1, 1, 1]
    # the logged lr is the one each step's update applies; a skipped step applies none, so the schedule
    # does not move and step 5 applies the LR step 4 would have
    assert records[3]["lr"] != records[4]["lr"] == records[5]["lr"] != records[6]["lr"]
    norms = global_norms(out)
    assert norms[4] == norms[3] != norms[5]  # the coefficients did not move at the skipped step


@pytest.mark.slow
def test_repeated_nan_stops_with_the_step_and_keeps_last_good_checkpoint(nan_run) -> None:
    from megaspec.train.checkpoint import latest_checkpoint

    out, proc = nan_run
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error: ")]
    assert len(errors) == 1 and "loss is not finite at step 9" in errors[0] and "--max_skipped_steps 2" in errors[0]
    assert max(losses(out)) == 9
    assert latest_checkpoint(out).name == "step-000005"
    assert not (out / "adapter").exists() and not (out / "final_metrics.json").exists()


def test_a_first_ctrl_c_asks_for_a_checkpointed_stop_and_a_second_interrupts():
    from megaspec.train.guard import StopSignal

    before = signal.getsignal(signal.SIGINT)
    try:
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT and stop.reason() == "signal SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, before if sig == signal.SIGINT else signal.SIG_DFL)
