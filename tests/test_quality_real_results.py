"""bench quality --real in pieces (--results FILE) and its temp folder.

The results-file tests run launch/bench.py's main in this process on the embedded tiny model with
megaspec.benchmarks.real_quality.run_once replaced by a fake that returns a result at once, so they
check the file logic alone: each finished row appended, rows of the same setup reused (and tabled
with the new ones), rows of another setup run again with the reason, a cut-off last line ignored.
The temp-folder tests run the real job processes: a failed run and a SIGTERM mid-run leave no
/tmp/megaspec-real-quality-* folder, and the failed run's log is kept where the error line says.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import pytest

from megaspec.benchmarks import real_quality
from megaspec.train.embedded import embedded_base
from tests.distributed import REPO
from tests.launcher import cpu_env, parity_task

LOSS = {"base model, no fine-tuning": 3.0, "lora r=8 (q,v)": 1.0, "lora r=16 (q,v)": 0.9}  # ssh rows: 1.2


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("launch_bench", REPO / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_runs(monkeypatch) -> list[tuple[str, float, int]]:
    """run_once replaced: (label, lr, seed) of each run; the result's eval loss from LOSS, lower by 0.01 per lr step."""
    calls: list[tuple[str, float, int]] = []

    def run_once(row, lr, seed, s):
        calls.append((row.label, lr, seed))
        loss = LOSS.get(row.label, 1.2) - (0.01 if lr == 0.02 else 0.0)
        return {"trainable": 0 if row.kind == "none" else 100, "eval_loss": loss, "eval_ppl": 2.718 ** loss, "exact_match": 0.5,
                "tokens_per_s": None if row.kind == "none" else 1000.0, "predictions": ["yes"], "seconds": 1.0}

    monkeypatch.setattr(real_quality, "run_once", run_once)
    return calls


def piece(tmp_path: Path, capsys, *args: str) -> tuple[int, list[dict], str]:
    """(exit code, result rows, stderr) of `bench quality --real --json` on the parity task, 1 seed, budget 1/100 on q,v."""
    train, test = parity_task(tmp_path)
    argv = ["quality", "--real", "--json", "--model", str(embedded_base()), "--dataset", str(train), "--test", str(test),
            "--seeds", "0", "--lrs", "0.01", "--budgets", "100", "--targets", "qv", "--steps", "2", "--results",
            str(tmp_path / "q.jsonl"), *args]
    capsys.readouterr()
    try:
        code = bench().main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, json.loads(out)["result"] if code == 0 else [], err


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_appended_as_they_finish_and_a_later_piece_reuses_them(tmp_path, capsys, fake_runs):
    code, rows, err = piece(tmp_path, capsys, "--methods", "lora")
    assert code == 0, err
    assert [c[0] for c in fake_runs] == ["base model, no fine-tuning", "lora r=8 (q,v)", "lora r=16 (q,v)"]
    recorded = lines(tmp_path / "q.jsonl")
    assert [r["label"] for r in recorded] == [c[0] for c in fake_runs]
    setup = recorded[0]["setup"]
    assert (setup["steps"], setup["batch"], setup["seq_len"], setup["seeds"], setup["eval_limit"], setup["eval_batches"]) == \
        (2, 8, 256, [0], 500, "all")
    assert setup["device"] == "cpu" and setup["ds_config"]["train_micro_batch_size_per_gpu"] == 8
    assert setup["dataset"].startswith("parity.jsonl, ") and "sha256" in setup["dataset"]
    assert recorded[1]["row"] == {"kind": "megaspec", "method": "lora", "fields": {"lora_rank": 8, "alpha": 16.0},
                                  "targets": ["q_proj", "v_proj"], "lrs": [0.01]}
    assert recorded[1]["result"]["loss_mean"] == 1.0 and "recovered" not in recorded[1]["result"]
    assert "0 rows reused (0 of this run's 3, 0 more from earlier pieces), 3 to run" in err

    fake_runs.clear()  # the second piece: SSH alone; the base is reused, the LoRA reference comes from the file
    code, rows, err = piece(tmp_path, capsys, "--methods", "ssh")
    assert code == 0, err
    assert [c[0] for c in fake_runs] == ["ssh n=8 (1/100 LoRA8, q,v)"]
    assert "3 rows reused (1 of this run's 2, 2 more from earlier pieces), 1 to run" in err
    by_label = {r["label"]: r for r in rows}
    assert list(by_label) == ["base model, no fine-tuning", "ssh n=8 (1/100 LoRA8, q,v)", "lora r=8 (q,v)", "lora r=16 (q,v)"]
    assert [r["reused"] for r in rows] == [True, False, True, True]
    assert by_label["ssh n=8 (1/100 LoRA8, q,v)"]["recovered"] == pytest.approx((3.0 - 1.2) / (3.0 - 1.0))
    assert by_label["lora r=16 (q,v)"]["recovered"] == pytest.approx(1.05)
    assert len(lines(tmp_path / "q.jsonl")) == 4

    fake_runs.clear()  # the same command again: nothing to run, the table from the file
    code, rows, err = piece(tmp_path, capsys, "--methods", "ssh")
    assert code == 0 and fake_runs == [] and len(rows) == 4, err
    code, _, err = piece(tmp_path, capsys, "--methods", "ssh")
    assert "4 rows reused (2 of this run's 2, 2 more from earlier pieces), 0 to run" in err


def test_a_row_recorded_under_another_setup_is_run_again_and_the_line_says_why(tmp_path, capsys, fake_runs):
    assert piece(tmp_path, capsys, "--methods", "lora")[0] == 0
    fake_runs.clear()
    code, rows, err = piece(tmp_path, capsys, "--methods", "lora", "--lrs", "0.01,0.02")
    assert code == 0, err
    # the base's definition has no lrs: reused; both LoRA rows now sweep two lrs: run again
    assert [c[0] for c in fake_runs] == ["lora r=8 (q,v)"] * 2 + ["lora r=16 (q,v)"] * 2
    assert "q.jsonl line 2: lora r=8 (q,v): not reused, recorded with row.lrs [0.01] (this run: [0.01, 0.02])" in err
    assert [r["lr"] for r in rows] == [None, 0.02, 0.02]

    fake_runs.clear()
    code, rows, err = piece(tmp_path, capsys, "--methods", "lora", "--steps", "3")
    assert code == 0, err
    assert len(fake_runs) == 3 and "q.jsonl line 1: base model, no fine-tuning: not reused, recorded with steps 2 (this run: 3)" in err
    assert all(not r["reused"] for r in rows)
    assert len(lines(tmp_path / "q.jsonl")) == 8  # every setup's rows stay in the file


def test_a_cut_off_last_line_is_ignored_with_a_warning_and_dropped_before_the_next_row(tmp_path, capsys, fake_runs):
    assert piece(tmp_path, capsys, "--methods", "lora")[0] == 0
    results = tmp_path / "q.jsonl"
    text = results.read_text()
    results.write_text(text + '{"label": "ssh n=8 (1/100 LoRA8, q,v)", "setup": {"model": "tin')  # a bench killed mid-write
    fake_runs.clear()
    code, rows, err = piece(tmp_path, capsys, "--methods", "ssh")
    assert code == 0, err
    assert "q.jsonl: line 4 is cut off (a bench killed while writing it): ignored" in err
    assert [c[0] for c in fake_runs] == ["ssh n=8 (1/100 LoRA8, q,v)"]
    assert results.read_text().startswith(text) and [r["label"] for r in lines(results)][-1] == "ssh n=8 (1/100 LoRA8, q,v)"
    assert real_quality.read_results(str(results))[1] is None and len(lines(results)) == 4


def test_without_the_reference_row_the_gain_column_says_why(tmp_path, capsys, fake_runs):
    code, rows, err = piece(tmp_path, capsys, "--methods", "ssh")
    assert code == 0, err
    assert all(r["recovered"] is None for r in rows)
    text = real_quality.format_table(rows)
    assert "of LoRA8's gain: not computed, no lora r=8 (q,v) row (run it: --methods lora; or reuse one" in text
    assert "target: not measured" in text


@pytest.mark.parametrize("content, expect", [
    ("not json\n", "line 1 is not a row of bench quality --real"),
    ('{"label": "x"}\n', "line 1 is not a row"),
    ("[1, 2]", "line 1 is not a row"),  # no newline, but not a cut-off row either
])
def test_a_file_that_is_not_a_results_file_is_refused(tmp_path, content, expect):
    (tmp_path / "r.jsonl").write_text(content)
    with pytest.raises(real_quality.ResultsError, match=expect):
        real_quality.read_results(str(tmp_path / "r.jsonl"))


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob(real_quality.WORK_PREFIX + "*"))


def test_a_failed_run_leaves_no_temp_folder_and_keeps_its_log_beside_the_results(tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"question": "no prompt or response"}\n')  # the job fails reading it
    code, _, err = piece(tmp_path, capsys, "--methods", "lora", "--dataset", str(tmp_path / "broken.jsonl"))
    assert code == 1, err
    error = next(line for line in err.splitlines() if line.startswith("bench: error: "))
    kept = tmp_path / "real-quality-failed-base-model-no-fine-tuning-lr0-seed0.log"
    assert f"base model, no fine-tuning at lr 0, seed 0 failed (exit 1); its log: {kept}" in error
    assert kept.is_file() and "Traceback" in kept.read_text()
    assert leftovers(scratch) == []
    assert not (tmp_path / "q.jsonl").exists()  # no row finished


def test_sigterm_mid_run_ends_the_job_and_removes_the_temp_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    train, test = parity_task(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "launch/bench.py", "quality", "--real", "--model", str(embedded_base()), "--dataset", str(train),
         "--test", str(test), "--methods", "lora", "--seeds", "0", "--lrs", "0.01", "--steps", "2", "--targets", "qv",
         "--budgets", "100", "--results", str(tmp_path / "q.jsonl")],
        cwd=REPO, env=cpu_env(TMPDIR=str(scratch)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(w.glob("*.log") for w in leftovers(scratch)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)  # until the first run's job has started
    assert proc.poll() is None and leftovers(scratch), "the first run did not start within 60 s"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines()[-1] == f"bench: interrupted; the rows finished so far are in {tmp_path / 'q.jsonl'}: run the same command to go on"
    assert leftovers(scratch) == [] and out == ""
