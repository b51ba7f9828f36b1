"""One run of `bench quality --real`: the trainer's ZeRO-3 loop with one row's adapters, then the task metric.

`python -m megaspec.benchmarks.real_quality_job SPEC.json` (one process, one rank). SPEC holds the row
(`kind`: "megaspec", "peft_lora", "peft_fourierft" or "none"; peft's config `fields` and `targets`),
`train_args` (launch/train.py's flags), the held-out `test` file, `eval_limit` and the `result` path.

Trained rows go through megaspec.train.loop.train, the loop launch/train.py runs: megaspec rows with
the method's adapters, peft rows with peft's layers injected in their place (its `adapt` argument),
so every row sees the same partitioned base, data order, optimizer, LR schedule and evaluation. The
task metric is then scored on the trained model in this process (greedy completions through the
ZeRO-3 hooks, prompts wrapped in the run's chat template). The untrained base ("none") is evaluated
the same way, without the engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from megaspec.model import AdapterSummary, summarize


def train_config(argv: list[str]) -> Any:
    """launch/train.py's TrainConfig from its flags (megaspec.config)."""
    from megaspec.config import add_flags, parse_config
    from megaspec.train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="real_quality_job")
    add_flags(parser, TrainConfig)
    return parse_config(parser, TrainConfig, argv)


def peft_trainables(kind: str, fields: dict[str, Any], targets: list[str], models: list[torch.nn.Module]) -> Any:
    """loop.Trainables for peft's LoRA or FourierFT: injected into the base in place (seeded), written with save_pretrained."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    from megaspec.train.loop import Trainables

    wrapped: list[Any] = []

    def apply(model: torch.nn.Module, cfg: Any) -> AdapterSummary:
        torch.manual_seed(cfg.seed)
        if kind == "peft_lora":
            config: Any = peft.LoraConfig(target_modules=targets, lora_dropout=0.0, **fields)
        else:
            config = peft.FourierFTConfig(target_modules=targets, **fields)
        wrapped.append(peft.get_peft_model(model, config))  # replaces the target linears of `model` itself
        models.append(model)
        summary = summarize(model, kind)
        summary.layers = [
            {"name": name, "shape": [module.out_features, module.in_features],
             "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}
            for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
        ]
        return summary

    def save(model: torch.nn.Module, folder: Path) -> None:
        import deepspeed

        from megaspec.distributed.comm import rank

        trainable = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable):  # collective: whole adapter tensors on every rank
            if rank() == 0:
                wrapped[0].save_pretrained(str(folder))

    return Trainables(apply, save)


def median_tokens_per_s(run: Path) -> float | None:
    """The median of the run's per-step tokens/s, the first step (warm-up) left out."""
    values = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step", 0) > 1 and "tokens_per_s" in record:
            values.append(float(record["tokens_per_s"]))
    return statistics.median(values) if values else None


def trained(cfg: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Train through the loop, then score the trained model."""
    from megaspec.train.loop import Trainables, megaspec_adapters, train

    row = spec["row"]
    models: list[torch.nn.Module] = []  # the adapted base, kept to score it after training

    def megaspec_apply(model: torch.nn.Module, run_cfg: Any) -> AdapterSummary:
        models.append(model)
        return megaspec_adapters(model, run_cfg)

    if row["kind"] == "megaspec":
        trainables = Trainables(apply=megaspec_apply)
    else:
        trainables = peft_trainables(row["kind"], row["fields"], row["targets"], models)
    final = train(cfg, trainables=trainables)
    if "eval_loss" not in final:
        raise RuntimeError("the run ended without an evaluation: its eval split is empty")
    return {"trainable": int(final["trainable"]), "eval_loss": final["eval_loss"], "eval_ppl": final["eval_ppl"],
            "tokens_per_s": median_tokens_per_s(Path(final["output_dir"])), **task_metric(models[0], cfg, spec)}


def untrained(cfg: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The base as loaded for training, evaluated on the run's eval split and scored, no engine."""
    from transformers import AutoModelForCausalLM

    from megaspec.distributed.comm import device
    from megaspec.distributed.group import init_distributed
    from megaspec.gguf import resolve_model, run_dtype
    from megaspec.train.data_cache import node_datasets
    from megaspec.train.dsconfig import read_ds_config
    from megaspec.train.loop import data_config, evaluate, run_tokenizer

    raw_ds = read_ds_config(cfg.ds_config)
    init_distributed()
    dtype = run_dtype(raw_ds)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model, dtype), dtype=dtype).to(device())
    model.config.use_cache = False
    _, eval_set = node_datasets(data_config(cfg), run_tokenizer(cfg), cfg.data_cache, uuid.uuid4().hex)
    with torch.no_grad():
        metrics = evaluate(model, eval_set, int(raw_ds.get("train_micro_batch_size_per_gpu", 1)), cfg.eval_batches)
    return {"trainable": 0, **metrics, "tokens_per_s": None, **task_metric(model, cfg, spec)}


def task_metric(model: torch.nn.Module, cfg: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Exact match of greedy completions of the first eval_limit held-out records (megaspec.assets.tasks.score)."""
    from megaspec.assets.tasks import read_jsonl, score
    from megaspec.train.chat import resolve_template
    from megaspec.train.loop import run_tokenizer

    tokenizer = run_tokenizer(cfg)
    records = read_jsonl(spec["test"])[: spec["eval_limit"]]
    with torch.no_grad():
        result = score(model, tokenizer, records, template=resolve_template(tokenizer, cfg.chat_template))
    return {"exact_match": result["exact_match"], "predictions": result["predictions"][:5]}


def main(argv: list[str] | None = None) -> int:
    """Run the SPEC's row and write its result JSON (seconds included)."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    start = time.perf_counter()
    cfg = train_config(spec["train_args"])
    result = untrained(cfg, spec) if spec["row"]["kind"] == "none" else trained(cfg, spec)
    result["seconds"] = time.perf_counter() - start
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
