"""Parameter counts on a meta-device LLaMA-3.1-8B: the paper's 0.048M, with no real memory."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megaspec import AdapterConfig, apply_adapters, trainable_parameter_count


def llama31_8b_meta():
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_llama31_8b_counts_on_meta():
    before = rss_bytes()
    ssh = llama31_8b_meta()
    summary = apply_adapters(ssh, AdapterConfig(method="ssh", n_coeffs=750, target_modules=["q_proj", "v_proj"]))
    assert trainable_parameter_count(ssh) == summary.trainable == 48_000
    assert summary.nominal and len(summary.layers) == 64
    lora = llama31_8b_meta()
    apply_adapters(lora, AdapterConfig(method="lora", lora_rank=64, target_modules=["q_proj", "v_proj"]))
    assert trainable_parameter_count(lora) == 27_262_976
    assert sum(p.numel() for p in lora.parameters()) == 8_030_261_248 + 27_262_976
    for model in (ssh, lora):
        assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert rss_bytes() - before < 200 * 2**20  # an 8B model in fp32 would be 32 GB
