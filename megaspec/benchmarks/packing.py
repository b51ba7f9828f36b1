"""Cost of isolated packing against naive packing (`python launch/bench.py packing`).

The embedded corpus is tokenized with the model's tokenizer and packed into --seq_len blocks both
ways (megaspec.train.data); each way runs the same forward+backward micro-batches of the whole model
(no optimizer), interleaved so load on a shared machine hits both alike. Isolated batches carry
position_ids and no attention_mask, so transformers builds a block-diagonal causal mask per micro-batch.
"""

from __future__ import annotations

import time
from typing import Any

import torch

MODES = ("naive", "isolated")


def run(model: str | None = None, seq_len: int = 512, batch: int = 4, steps: int = 4, attn: str = "sdpa",
        records: int = 400) -> dict[str, Any]:
    """tokens/s of forward+backward for naive and isolated packing of the same records."""
    from transformers import AutoModelForCausalLM

    from megaspec.train.data import DataConfig, batch_iterator, build_datasets, load_tokenizer
    from megaspec.train.embedded import embedded_base

    folder = model or str(embedded_base())
    tokenizer = load_tokenizer(folder)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    net.config.use_cache = False
    net.train()
    streams, docs = {}, {}
    for mode in MODES:
        cfg = DataConfig(seq_len=seq_len, seed=0, format="text", eval_fraction=0.0, packing=mode, embedded_records=records)
        blocks, _ = build_datasets(cfg, tokenizer)
        streams[mode] = batch_iterator(blocks, batch, seed=0)
        if mode == "isolated":
            docs = {"blocks": len(blocks), "docs_per_block": float((blocks.position_ids == 0).sum()) / len(blocks)}
    seconds = dict.fromkeys(MODES, 0.0)
    for step in range(steps + 1):  # step 0 warms up
        for mode in MODES:
            b = next(streams[mode])
            t0 = time.perf_counter()
            net(**b).loss.backward()
            net.zero_grad(set_to_none=True)
            if step:
                seconds[mode] += time.perf_counter() - t0
    tokens = steps * batch * seq_len
    rows = [{"packing": m, "attn": attn, "tokens_per_s": tokens / seconds[m], "step_s": seconds[m] / steps} for m in MODES]
    return {"model": folder, "seq_len": seq_len, "batch": batch, "steps": steps, **docs, "rows": rows,
            "isolated_over_naive": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]}


def format_table(result: dict[str, Any]) -> str:
    """The two rows and the ratio."""
    from megaspec.benchmarks.common import table

    head = (f"{result['model']}: seq_len {result['seq_len']}, batch {result['batch']}, {result['steps']} steps, "
            f"{result.get('docs_per_block', 0):.1f} documents per block")
    body = table(result["rows"], [("packing", "packing", ""), ("attn", "attn", ""), ("tokens_per_s", "tokens/s", ",.0f"),
                                  ("step_s", "s/step", ".3f")])
    return f"{head}\n{body}\nisolated / naive tokens/s: {result['isolated_over_naive']:.3f}"
