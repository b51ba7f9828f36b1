"""Shared fixtures: tiny LLaMA models built in the test, nothing downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides):
    """A 2-layer GQA LLaMA config: q is square, k/v are 32 x 64, the MLP is 128 x 64 and 64 x 128."""
    from transformers import LlamaConfig

    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return LlamaConfig(**base)


@pytest.fixture
def tiny_model():
    """A seeded tiny LLaMA in eval mode, fp32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()
