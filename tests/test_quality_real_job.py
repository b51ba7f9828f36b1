"""bench quality --real's run (megaspec.benchmarks.real_quality_job): peft through megaspec's ZeRO-3 loop.

The tiny embedded model trains peft LoRA for 3 steps through megaspec.train.loop.train; the adapter the
loop writes (peft's save_pretrained, gathered from the ZeRO-3 partitions) must reload with PeftModel
into a model whose eval loss on the run's eval split equals the one the run reported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.distributed import REPO, free_port
from tests.launcher import cpu_env, parity_task


def test_peft_lora_trains_through_the_loop_and_its_saved_adapter_reproduces_the_eval_loss(tmp_path):
    train, test = parity_task(tmp_path)
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text()) | {"train_micro_batch_size_per_gpu": 4}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run = tmp_path / "run"
    args = ["--dataset", str(train), "--ds_config", str(tmp_path / "ds.json"), "--output_dir", str(run), "--max_steps", "3",
            "--seq_len", "32", "--lr", "0.01", "--seed", "3", "--eval_every", "3", "--eval_batches", "1000", "--save_every", "3",
            "--image_every", "4", "--report", "none", "--data_cache", "none", "--target_modules", "q_proj,v_proj"]
    spec = {"row": {"kind": "peft_lora", "fields": {"r": 8, "lora_alpha": 16}, "targets": ["q_proj", "v_proj"]},
            "train_args": args, "test": str(test), "eval_limit": 3, "result": str(tmp_path / "result.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "megaspec.benchmarks.real_quality_job", str(tmp_path / "spec.json")], cwd=REPO,
                          env=cpu_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["trainable"] == 2 * 8 * ((64 + 64) + (64 + 32))  # LoRA r=8 on q 64x64, v 32x64, 2 layers
    assert 0.0 <= result["exact_match"] <= 1.0 and len(result["predictions"]) == 3 and result["tokens_per_s"] > 0
    assert "peft_lora: 3,584 trainable" in proc.stdout + proc.stderr

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megaspec.benchmarks.real_quality_job import train_config
    from megaspec.train.data_cache import node_datasets
    from megaspec.train.embedded import embedded_base
    from megaspec.train.loop import data_config, evaluate, run_tokenizer

    def base() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(str(embedded_base()), dtype=torch.float32)
        model.config.use_cache = False  # as the trainer runs it: packed documents then attend only within themselves
        return model

    cfg = train_config(args)
    _, eval_set = node_datasets(data_config(cfg), run_tokenizer(cfg), None, "test")
    with torch.no_grad():
        reloaded = evaluate(PeftModel.from_pretrained(base(), str(run / "adapter")), eval_set, 4, 1000)
        untrained = evaluate(base(), eval_set, 4, 1000)
    assert abs(reloaded["eval_loss"] - result["eval_loss"]) < 1e-4, (reloaded, result)
    assert result["eval_loss"] < untrained["eval_loss"] - 0.01  # 3 steps at lr 0.01 moved it
