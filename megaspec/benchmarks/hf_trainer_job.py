"""The usual tool on megaspec's job, for `bench host_memory`: HF Trainer + peft LoRA under the same DeepSpeed config.

One rank of `deepspeed --num_gpus N --module megaspec.benchmarks.hf_trainer_job ...`: the model folder
loaded partitioned (TrainingArguments registers the ZeRO-3 config before from_pretrained, so
transformers loads under zero.Init), peft LoRA on --target_modules, the same packed token blocks as
megaspec's trainer (megaspec.train.data), --max_steps steps, nothing saved.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any


def main() -> None:
    """Parse, build, train; print one JSON line with the steps done and the last loss (rank 0)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--ds_config", required=True)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--max_steps", type=int, default=3)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--target_modules", default="q_proj,v_proj")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = p.parse_args()

    with open(args.ds_config) as f:
        ds_config = json.load(f)
    ds_config["train_micro_batch_size_per_gpu"] = args.micro_batch
    ds_config.get("bf16", {})["enabled"] = False  # fp32 as megaspec's CPU ranks
    with tempfile.TemporaryDirectory(prefix="hf-trainer-job-") as out:
        result = train(args, ds_config, out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"hf_trainer_steps": result.global_step, "train_loss": result.training_loss}), flush=True)


def train(args: argparse.Namespace, ds_config: dict[str, Any], out: str) -> Any:
    """TrainingArguments first (it registers ZeRO-3 for from_pretrained), then the model, peft, data and Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from megaspec.train.data import DataConfig, build_datasets, load_tokenizer

    training = TrainingArguments(
        output_dir=out, per_device_train_batch_size=args.micro_batch, max_steps=args.max_steps, learning_rate=args.lr,
        deepspeed=ds_config, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=args.target_modules.split(","), lora_dropout=0.0)
    model = get_peft_model(model, lora)
    tokenizer = load_tokenizer(args.model)
    blocks, _ = build_datasets(DataConfig(dataset=args.dataset, seq_len=args.seq_len, seed=0, eval_fraction=0.05), tokenizer)
    trainer = Trainer(model=model, args=training, train_dataset=blocks)
    return trainer.train()


if __name__ == "__main__":
    main()
