"""The embedded default base: a tiny LLaMA pretrained on the generated corpus, built once and cached.

Fine-tuning a randomly initialised model says little about an adapter, so the default job first
pretrains the tiny model (plain PyTorch, one thread, fixed seed: the same bytes on every machine)
on the embedded corpus and then fine-tunes it on the shifted embedded instruction task.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megaspec.distributed.comm import rank, world_size
from megaspec.tiny import embedded_tokenizer, tiny_llama_config
from megaspec.train.data import DataConfig, batch_iterator, build_datasets

PRETRAIN_STEPS = 300
PRETRAIN = {"lr": 3e-3, "batch": 16, "seq_len": 128, "seed": 0}
VERSION = "v1"


def cache_root() -> Path:
    """Where built artefacts are cached ($MEGASPEC_CACHE, default ~/.cache/megaspec)."""
    return Path(os.environ.get("MEGASPEC_CACHE", "~/.cache/megaspec")).expanduser()


def pretrain_tiny(out: Path, steps: int = PRETRAIN_STEPS) -> Path:
    """Train the tiny LLaMA on the embedded corpus and save it with its tokenizer (HF format)."""
    from transformers import LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical on every machine regardless of its cores
    try:
        tokenizer = embedded_tokenizer()
        data = DataConfig(dataset=None, seq_len=PRETRAIN["seq_len"], seed=PRETRAIN["seed"], format="text", eval_fraction=0.0)
        train_set, _ = build_datasets(data, tokenizer)
        torch.manual_seed(PRETRAIN["seed"])
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
        opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PRETRAIN["lr"], total_steps=steps, pct_start=0.1)
        batches = batch_iterator(train_set, PRETRAIN["batch"], PRETRAIN["seed"])
        model.train()
        for _ in range(steps):
            batch = next(batches)
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    return out


def embedded_base() -> Path:
    """The cached pretrained tiny LLaMA folder; rank 0 builds it on first use, the others wait."""
    path = cache_root() / f"tiny-llama-{VERSION}-{PRETRAIN_STEPS}"
    if rank() == 0 and not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pretrain_tiny(path)
    if world_size() > 1:
        torch.distributed.barrier()
    return path
