"""A real SLURM on this machine for tests: slurmctld plus one slurmd per node, all on localhost.

    with SlurmCluster(tmp_path) as cluster:                       # nodes node1, node2; 2 CPUs each
        job = cluster.sbatch(["--nodes", "2", "slurm/train.sbatch", "--max_steps", "10"])
        info = cluster.wait(job, timeout=180)                     # scontrol's fields of the job
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"

Debian's slurm-wlm runs several `slurmd -N NAME` on one host when every node has its own port
and spool dir. No munge (auth/none, cred/none), no cgroups (proctrack/linuxproc, task/none), no
slurmdbd (so no sacct: job states come from `scontrol show job`, kept MinJobAge seconds). Needs
root, since slurmd starts job steps as the submitting user. Daemons run in their own process
groups and are stopped by PID; jobs still queued at exit are cancelled first.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .distributed import CPU_ENV, REPO, free_port

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Variables of an enclosing SLURM job (CI on a cluster) would leak into sbatch's option parsing.
JOB_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


def missing() -> str | None:
    """Why a local SLURM cannot run here, or None when it can."""
    absent = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if absent:
        return f"SLURM not installed ({', '.join(absent)} missing); run .ci/slurm-setup.sh"
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd launches job steps as the submitting user)"
    return None


def slurm_conf(root: Path, nodes: list[str], cpus: int, ctld_port: int, node_ports: list[int]) -> str:
    """The slurm.conf of a localhost cluster whose state, spool and logs all live under `root`."""
    lines = [
        "ClusterName=megaspec-test",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/none",
        "CredType=cred/none",
        # also how long a requeued job waits before it may start again (default 120 s)
        "AuthInfo=cred_expire=10",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=bf_interval=1,sched_interval=1",
        "ReturnToService=2",
        # node CPUs come from this file, not the hardware (no drain on a machine with fewer cores)
        "SlurmdParameters=config_overrides",
        "MailProg=/bin/true",
        "JobRequeue=1",
        "KillWait=10",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for name, port in zip(nodes, node_ports, strict=True):
        lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class SlurmCluster:
    """slurmctld + `len(nodes)` slurmd daemons under `root`; clients see it through SLURM_CONF."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("node1", "node2"), cpus: int = 2) -> None:
        self.root = Path(root)
        self.nodes = list(nodes)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.jobs: list[int] = []

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Write the config, start the daemons, and return once every node is idle."""
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        for name in self.nodes:
            (self.root / f"spool-{name}").mkdir(exist_ok=True)  # slurmd does not create it
        ports = [free_port() for _ in range(len(self.nodes) + 1)]
        self.conf.write_text(slurm_conf(self.root, self.nodes, self.cpus, ports[0], ports[1:]))
        try:
            self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for name in self.nodes:
                self._daemon(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel this cluster's unfinished jobs, then stop the daemons (their process groups)."""
        if self.procs and self.procs[0].poll() is None and self.jobs:
            self._run(["scancel", *map(str, self.jobs)], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.procs):
            _stop_group(proc)
        self.procs.clear()

    def _daemon(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up\n{self.logs()}")
            result = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise TimeoutError(f"nodes not idle after {timeout:.0f}s: {states}\n{self.logs()}")

    # --- clients ---------------------------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment for SLURM clients and jobs: SLURM_CONF set, this Python's
        bin directory first on PATH (jobs find the same venv), ranks on CPU with one thread."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(JOB_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/sbin", env.get("PATH", "")])
        env.update(CPU_ENV)
        env.update(extra or {})
        return env

    def _run(self, argv: list[str], check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, capture_output=True, text=True, env=env or self.env(), cwd=REPO, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, args: list[str], env: dict[str, str] | None = None) -> int:
        """Submit from the repository root; returns the job id. `env` adds to the job's environment."""
        result = self._run(["sbatch", "--parsable", *args], env=self.env(env))
        job_id = int(result.stdout.strip().split(";")[0])
        self.jobs.append(job_id)
        return job_id

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, until: set[str] = TERMINAL, restarts: int = 0) -> dict[str, str]:
        """Poll until the job's state is in `until` (after at least `restarts` requeues)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until and int(info.get("Restarts", "0")) >= restarts:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(until)} after {timeout:.0f}s: {info}\n{self.logs()}")

    def scancel(self, job_id: int, *options: str) -> None:
        self._run(["scancel", *options, str(job_id)])

    def scontrol(self, *args: str) -> None:
        """`scontrol ARGS`, e.g. ("update", "NodeName=node2", "State=DRAIN", "Reason=test")."""
        self._run(["scontrol", *args])

    def logs(self, tail: int = 1500) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the daemon's process group; once it exits (or after 10 s) SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait()
