"""slurm/*.sbatch end to end on a real two-node SLURM on this machine (tests/slurm_cluster.py).

The oracle is one `deepspeed --num_gpus 2` run of the same job on CPU: every SLURM run of it,
straight through, stopped by a signal and resubmitted, or requeued by itself, must log the same
per-step losses on two ranks, each step exactly once.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from megaspec.train.checkpoint import verify_checkpoint

from .distributed import REPO
from .launcher import check, losses, metrics, run_train
from .slurm_cluster import SlurmCluster, missing

STEPS = 40
TRAIN = ["--max_steps", str(STEPS), "--save_every", "20", "--eval_every", "20"]
# The #SBATCH defaults ask for 8 GPUs and 8 CPUs per task; a CPU run overrides them on the command line.
TWO_CPU_NODES = ["--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1"]
ONE_CPU_NODE_TWO_RANKS = ["--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1"]
JOB_TIMEOUT = 240.0

needs_slurm = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """step -> loss of the same job under `deepspeed --num_gpus 2`."""
    out = tmp_path_factory.mktemp("reference") / "run"
    check(run_train([*TRAIN, "--output_dir", str(out)], ranks=2))
    return losses(out)


def submit(cluster: SlurmCluster, script: str, nodes: list[str], out: Path, *extra: str, env: dict | None = None) -> int:
    log = out.parent / f"{out.name}-%j.log"
    return cluster.sbatch([*nodes, "--output", str(log), script, *TRAIN, "--output_dir", str(out), *extra], env=env)


def job_log(out: Path, job: int) -> str:
    return (out.parent / f"{out.name}-{job}.log").read_text(errors="replace")


def assert_completed(info: dict[str, str], out: Path, job: int) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{job_log(out, job)[-6000:]}"


def wait_for_steps(cluster: SlurmCluster, job: int, out: Path, steps: int = 3) -> None:
    """Until the run has logged `steps` steps (its signal handler is in place by then)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    log = out / "metrics.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= steps):
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job} {state} before step {steps}\n{job_log(out, job)[-6000:]}"
        assert time.monotonic() < deadline, f"no step {steps} after {JOB_TIMEOUT:.0f}s\n{job_log(out, job)[-6000:]}"
        time.sleep(0.2)


def assert_matches_reference(out: Path, reference: dict[int, float]) -> None:
    """Every step logged once, in order, by two ranks, with the reference's loss."""
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {r["world_size"] for r in records} == {2}
    got = {r["step"]: r["loss"] for r in records}
    assert got == pytest.approx(reference, abs=1e-4)


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "slurm/train_deepspeed.sbatch", "slurm/common.sh", "slurm/task.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


@pytest.mark.slow
@needs_slurm
def test_two_nodes_match_deepspeed_launcher(cluster, reference, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, "slurm/train.sbatch", TWO_CPU_NODES, out)
    assert_completed(cluster.wait(job, JOB_TIMEOUT), out, job)
    assert "on node1 node2, rendezvous 127.0.0.1:" in job_log(out, job)
    assert_matches_reference(out, reference)


@pytest.mark.slow
@needs_slurm
def test_sigterm_checkpoints_and_resubmit_resumes(cluster, reference, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, "slurm/train.sbatch", TWO_CPU_NODES, out)
    wait_for_steps(cluster, job, out)
    cluster.scancel(job, "--signal=TERM")  # to the job steps (the ranks), as preemption does
    info = cluster.wait(job, JOB_TIMEOUT)
    # stopped with a checkpoint: exit 75, which SLURM shows as FAILED; no final files until the run finishes
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "75:0"), f"{info}\n{job_log(out, job)[-6000:]}"
    assert info["Restarts"] == "0"  # TERM means stop: no requeue
    assert not (out / "final_metrics.json").exists() and not (out / "adapter").exists()
    stopped = max(r["step"] for r in metrics(out))
    assert 3 <= stopped < STEPS
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step-{stopped:06d}" and verify_checkpoint(latest)
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped + 1))

    again = submit(cluster, "slurm/train.sbatch", TWO_CPU_NODES, out, "--resume")
    assert_completed(cluster.wait(again, JOB_TIMEOUT), out, again)
    assert f"resumed from {latest} at step {stopped}" in job_log(out, again)
    assert json.loads((out / "final_metrics.json").read_text())["step"] == STEPS
    assert_matches_reference(out, reference)


@pytest.mark.slow
@needs_slurm
def test_usr1_checkpoints_requeues_and_resumes(cluster, reference, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, "slurm/train.sbatch", TWO_CPU_NODES, out)
    wait_for_steps(cluster, job, out)
    cluster.scancel(job, "--batch", "--signal=USR1")  # what --signal=B:USR1@120 does before the time limit
    info = cluster.wait(job, JOB_TIMEOUT, restarts=1)
    assert_completed(info, out, job)
    log = job_log(out, job)  # --open-mode=append: both runs
    assert "requeueing job" in log and "(restart 1)" in log and "resumed from" in log
    assert_matches_reference(out, reference)


@pytest.mark.slow
@needs_slurm
def test_started_on_two_nodes_requeued_on_one_finishes(cluster, reference, tmp_path):
    """Started on both nodes; node2 is drained (preempted) and the job requeued, then shrunk to the one node left:
    it resumes there, 1 rank accumulating 2 micro-batches of 4 where 2 ranks took 4 each, with the reference's losses."""
    out = tmp_path / "run"
    job = submit(cluster, "slurm/train.sbatch", TWO_CPU_NODES, out)
    wait_for_steps(cluster, job, out)
    cluster.scontrol("update", "NodeName=node2", "State=DRAIN", "Reason=preempted")  # the running job keeps it
    try:
        cluster.scancel(job, "--batch", "--signal=USR1")
        cluster.wait(job, JOB_TIMEOUT, until={"PENDING"}, restarts=1)  # requeued; 2 nodes can no longer start it
        cluster.scontrol("update", f"JobId={job}", "NumNodes=1", "NumTasks=1")
        info = cluster.wait(job, JOB_TIMEOUT, restarts=1)
    finally:
        cluster.scontrol("update", "NodeName=node2", "State=RESUME")
    assert_completed(info, out, job)
    log = job_log(out, job)
    assert "(restart 0) on node1 node2, rendezvous" in log and "(restart 1) on node1, rendezvous" in log
    assert "on 1 rank(s): global batch 8 as in the checkpoint: 1 rank(s) x micro-batch 4 x accumulation 2" in log
    records = metrics(out)
    sizes = [r["world_size"] for r in records]
    stopped = sizes.count(2)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert 3 <= stopped < STEPS and sizes == [2] * stopped + [1] * (STEPS - stopped)
    # 1e-4 as in assert_matches_reference: accumulating micro-batches instead of all-reducing over ranks changes
    # only the order of the gradient's fp32 sums
    assert {r["step"]: r["loss"] for r in records} == pytest.approx(reference, abs=1e-4)


@pytest.mark.slow
@needs_slurm
def test_deepspeed_launcher_one_node(cluster, reference, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, "slurm/train_deepspeed.sbatch", ONE_CPU_NODE_TWO_RANKS, out)
    assert_completed(cluster.wait(job, JOB_TIMEOUT), out, job)
    assert (tmp_path / "run.hostfile").read_text() == "node1 slots=2\n"
    assert_matches_reference(out, reference)


@pytest.mark.slow
@needs_slurm
def test_deepspeed_launcher_no_ssh_two_nodes_requeues(cluster, reference, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, "slurm/train_deepspeed.sbatch", TWO_CPU_NODES, out, env={"MEGASPEC_DS_NO_SSH": "1"})
    wait_for_steps(cluster, job, out)
    cluster.scancel(job, "--batch", "--signal=USR1")
    assert_completed(cluster.wait(job, JOB_TIMEOUT, restarts=1), out, job)
    assert (tmp_path / "run.hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert "requeueing job" in job_log(out, job)
    assert_matches_reference(out, reference)


@pytest.mark.slow
@needs_slurm
def test_check_says_in_one_line_what_the_real_partition_can_never_hold(cluster):
    """The test cluster's nodes have 2 CPUs: the script's default 8 CPUs per task never fits, the README's CPU line does."""
    import sys

    def check(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "slurm/check.py", *options, "slurm/train.sbatch"], cwd=REPO,
                              env=cluster.env(), capture_output=True, text=True, timeout=60)

    never = check("--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0")
    assert never.returncode == 2 and len(never.stderr.splitlines()) == 1, never.stderr
    assert "8 CPUs" in never.stderr and "pending forever" in never.stderr
    readme = check("--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "2")
    assert readme.returncode == 0 and readme.stderr == "", readme.stderr
    three = check("--nodes", "3", "--ntasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1")
    assert three.returncode == 2 and "3 node(s)" in three.stderr, three.stderr
