"""Per-rank peak resident memory of a training job: megaspec against HF Trainer + peft LoRA (`bench host_memory`).

The same job for every row: --model (default SmolLM2-135M-Instruct, `python -m megaspec.assets smollm2`),
the same packed --dataset blocks of --seq_len tokens, micro-batch 4 from the same DeepSpeed config
(ds_configs/zero3.json), fp32, q_proj and v_proj adapted, --steps optimizer steps, --ranks CPU ranks
started by the deepspeed launcher. Rows:
- megaspec SSH (n=750) and LoRA (r=8): `launch/train.py`;
- HF Trainer + peft LoRA (r=8): megaspec.benchmarks.hf_trainer_job, the way HF users run it;
each once with glibc's default (dynamic) mmap threshold and once with the fixed threshold megaspec
sets (megaspec.train.host_memory; $MALLOC_MMAP_THRESHOLD_ for HF, which has no such setting).

Per rank: the peak resident set of the rank process over the whole job (VmHWM, read from /proc
until it exits): loading, planning and training together, what a node's memory must hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaspec.benchmarks.common import free_port, table
from megaspec.benchmarks.selection import peak_bytes

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.2


@dataclass
class Job:
    """One row: which tool, which method, which malloc setting."""

    label: str
    tool: str  # "megaspec" | "hf"
    method: str  # megaspec method name, or "lora" for peft
    fixed_threshold: bool
    extra: list[str] = field(default_factory=list)


def jobs(methods: tuple[str, ...] = ("ssh", "lora")) -> list[Job]:
    """megaspec's methods and HF Trainer + peft LoRA, each with glibc's default and the fixed mmap threshold."""
    out = []
    for fixed in (False, True):
        malloc = "fixed mmap threshold" if fixed else "glibc default malloc"
        for method in methods:
            extra = ["--n_coeffs", "750"] if method in ("ssh", "fourierft", "s2ft") else ["--lora_rank", "8", "--alpha", "16"]
            out.append(Job(f"megaspec {method}, {malloc}", "megaspec", method, fixed, extra))
        out.append(Job(f"HF Trainer + peft lora, {malloc}", "hf", "lora", fixed))
    return out


def command(job: Job, model: str, dataset: str, ds_config: str, ranks: int, steps: int, seq_len: int, out: Path) -> list[str]:
    """The deepspeed launcher command of one row."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port())]
    common = ["--model", model, "--dataset", dataset, "--ds_config", ds_config, "--seq_len", str(seq_len), "--max_steps", str(steps)]
    if job.tool == "hf":
        return launcher + ["--module", "megaspec.benchmarks.hf_trainer_job", *common, "--micro_batch", "4", "--lora_r", "8"]
    return launcher + [str(REPO / "launch" / "train.py"), *common, "--method", job.method, *job.extra, "--target_modules", "q_proj,v_proj",
                       "--eval_every", "0", "--output_dir", str(out), "--overwrite"]


def job_env(job: Job) -> dict[str, str]:
    """The environment of one row: only the malloc setting differs between rows."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MEGASPEC_MMAP_THRESHOLD")}
    env.update(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    if job.tool == "megaspec" and not job.fixed_threshold:
        env["MEGASPEC_MMAP_THRESHOLD"] = "0"
    if job.tool == "hf" and job.fixed_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def _rank_pids(root: int) -> list[int]:
    """Processes under `root` started for a rank (the launcher passes --local_rank)."""
    import psutil

    pids = []
    try:
        for child in psutil.Process(root).children(recursive=True):
            try:
                if any("local_rank" in part for part in child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return pids


def measure(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one job; per rank process its peak resident bytes (VmHWM, polled until it exits) and the wall time."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            if time.perf_counter() - start > timeout:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{' '.join(cmd[:6])} ... did not finish in {timeout:.0f} s")
            for pid in _rank_pids(proc.pid):
                try:
                    peaks[pid] = max(peaks.get(pid, 0), peak_bytes(pid))
                except (OSError, KeyError):  # the rank exited between listing and reading
                    continue
            time.sleep(POLL_S)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"job failed (exit {proc.returncode}):\n{log.read()[-3000:]}")
    return {"peaks": sorted(peaks.values()), "seconds": time.perf_counter() - start}


def run(model: str, dataset: str, ds_config: str = "ds_configs/zero3.json", ranks: int = 2, steps: int = 3, seq_len: int = 256,
        methods: tuple[str, ...] = ("ssh", "lora"), timeout: float = 1800.0, log: Any = None) -> list[dict[str, Any]]:
    """Every row's per-rank peaks, in table order (log(str) reports progress)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="megaspec-hostmem-") as tmp:
        for i, job in enumerate(jobs(methods)):
            cmd = command(job, model, dataset, str(REPO / ds_config), ranks, steps, seq_len, Path(tmp) / f"run{i}")
            result = measure(cmd, job_env(job), timeout)
            peaks = result["peaks"]
            if len(peaks) != ranks:
                raise RuntimeError(f"{job.label}: saw {len(peaks)} rank processes, expected {ranks}")
            row = {"label": job.label, "peak_max": max(peaks), "peak_min": min(peaks), "seconds": result["seconds"]}
            rows.append(row)
            if log:
                log(f"{job.label}: peak per rank {min(peaks) / 2**30:.2f}-{max(peaks) / 2**30:.2f} GiB ({result['seconds']:.0f} s)")
    return rows


COLUMNS = [("label", "job", ""), ("peak_min", "peak/rank (lowest rank)", "bytes"), ("peak_max", "peak/rank (highest rank)", "bytes"),
           ("seconds", "wall s", ".0f")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """One row per job."""
    return table(rows, COLUMNS)
