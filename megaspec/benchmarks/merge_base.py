"""Which base a quantized run's adapter belongs on: held-out perplexity of each choice (`bench merge_base`).

An adapter trained against a --quantize base (QLoRA-style) is exported three ways; this measures
the held-out perplexity of each against the bases alone:
- the fp32 base (--model, default SmolLM2-135M-Instruct) and its quantized copy (bitsandbytes, as
  the trainer loads it);
- the adapter on the quantized base, as it was trained (megaspec's own load path, `generate.py`);
- `export --format merged --merge_base dequantized`: the dequantized weights + the update;
- `export --format merged --merge_base original`: the original fp32 weights + the update (default);
- `export --format peft` loaded with PeftModel on the original fp32 base (equals the row above).

Training: `launch/train.py` on one CPU rank under ds_configs/zero3.json, SSH with --n_coeffs per
layer on q_proj,v_proj, --steps steps of 4 x --seq_len tokens from --dataset. Held out: the first
--eval_blocks blocks of the dataset's test file (prompt + answer as plain text, every token scored),
never trained on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from megaspec.benchmarks.common import free_port, table

REPO = Path(__file__).resolve().parents[2]


def held_out_blocks(folder: str, dataset: str, seq_len: int, n_blocks: int) -> dict[str, torch.Tensor]:
    """The first n_blocks packed blocks of the test file's records read as plain text."""
    from megaspec.assets.tasks import read_jsonl, test_path
    from megaspec.train.data import DataConfig, build_datasets, load_tokenizer

    records = read_jsonl(str(test_path(dataset)))
    with tempfile.TemporaryDirectory(prefix="megaspec-heldout-") as tmp:
        text = Path(tmp) / "heldout.jsonl"
        text.write_text("".join(json.dumps({"text": r["prompt"] + r["response"]}) + "\n" for r in records))
        blocks, _ = build_datasets(DataConfig(dataset=str(text), seq_len=seq_len, seed=0, format="text", eval_fraction=0.0),
                                   load_tokenizer(folder))
    n = min(n_blocks, len(blocks))
    return {"input_ids": blocks.input_ids[:n], "labels": blocks.labels[:n], "attention_mask": blocks.attention_mask[:n]}


def perplexity(model: torch.nn.Module, blocks: dict[str, torch.Tensor]) -> float:
    """exp of the token-weighted cross-entropy over every scored token of the blocks."""
    from megaspec.benchmarks.quality import eval_loss

    return math.exp(eval_loss(model, blocks, batch=4))


def _launch(cmd: list[str], what: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")


def train_and_export(folder: str, dataset: str, quantize: str, steps: int, seq_len: int, n_coeffs: int, lr: float | None,
                     tmp: Path) -> Path:
    """Train SSH on the quantized base (1 CPU rank) and write the three exports beside the run; the run folder."""
    run = tmp / "run"
    train = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
             str(REPO / "launch" / "train.py"), "--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--model", folder,
             "--dataset", dataset, "--quantize", quantize, "--method", "ssh", "--n_coeffs", str(n_coeffs),
             "--target_modules", "q_proj,v_proj", "--max_steps", str(steps), "--seq_len", str(seq_len), "--eval_every", "0",
             "--output_dir", str(run)] + (["--lr", str(lr)] if lr else [])
    _launch(train, "training")
    export = [sys.executable, str(REPO / "launch" / "export.py"), "--run", str(run)]
    for base in ("original", "dequantized"):
        _launch(export + ["--format", "merged", "--merge_base", base, "--out", str(tmp / f"merged-{base}")], f"export merged onto {base}")
    _launch(export + ["--format", "peft", "--out", str(tmp / "peft")], "export peft")
    return run


def run(folder: str, dataset: str, quantize: str = "nf4", steps: int = 12, seq_len: int = 256, n_coeffs: int = 750,
        lr: float | None = None, eval_blocks: int = 32, log: Any = None) -> dict[str, Any]:
    """Train, export, and the held-out perplexity of every row."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megaspec.export.generate import load_for_inference
    from megaspec.quant import bnb_config, prepare_quantized

    blocks = held_out_blocks(folder, dataset, seq_len, eval_blocks)
    rows: list[dict[str, Any]] = []

    def row(label: str, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        ppl = perplexity(model, blocks)
        rows.append({"label": label, "ppl": ppl, "eval_s": time.perf_counter() - start})
        if log:
            log(f"{label}: ppl {ppl:.2f}")

    def fp32(path: str | Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)

    with tempfile.TemporaryDirectory(prefix="megaspec-mergebase-") as name:
        tmp = Path(name)
        start = time.perf_counter()
        run_dir = train_and_export(folder, dataset, quantize, steps, seq_len, n_coeffs, lr, tmp)
        train_s = time.perf_counter() - start
        row("base, fp32 (original)", fp32(folder))
        quantized = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=bnb_config(quantize, torch.float32))
        prepare_quantized(quantized)
        row(f"base, {quantize}", quantized)
        del quantized
        row(f"adapter on the {quantize} base, as trained", load_for_inference(run_dir)[0])
        row("merged, --merge_base dequantized", fp32(tmp / "merged-dequantized"))
        row("merged, --merge_base original (default)", fp32(tmp / "merged-original"))
        row("peft adapter on the original fp32 base", PeftModel.from_pretrained(fp32(folder), str(tmp / "peft")))
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {"rows": rows, "tokens": int(blocks["attention_mask"].sum()), "train_s": train_s,
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "setting": {"quantize": quantize, "steps": steps, "seq_len": seq_len, "n_coeffs": n_coeffs, "lr": lr}}


COLUMNS = [("label", "weights", ""), ("ppl", "held-out ppl", ".2f")]


def format_table(result: dict[str, Any]) -> str:
    """The setting line, then one row per choice of weights."""
    s = result["setting"]
    head = (f"SSH n={s['n_coeffs']} on q,v trained {s['steps']} steps on the {s['quantize']} base "
            f"(train loss {result['train_loss_first']:.3f} -> {result['train_loss_last']:.3f}, {result['train_s']:.0f} s); "
            f"held out: {result['tokens']:,} tokens")
    return head + "\n" + table(result["rows"], COLUMNS)
