"""Shared test helpers: tiny LLaMA models built in the test (nothing downloaded), the table of method cases,
a short training loop, ZeRO-3 set-up and the batch-8 DeepSpeed config of the 1-rank-vs-2-ranks job tests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from megaspec import AdapterConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


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


def save_llama(path: Path, config: Any, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    """A seeded random LLaMA (`config`: a LlamaConfig) saved in HF format, in shards of `max_shard_size` if given."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


# --- the table of method cases ---------------------------------------------------------------


@dataclass(frozen=True)
class MethodCase:
    """One adapter setting on the tiny LLaMA, and what 8 AdamW steps at `lr` must do to its loss (fall by `gain`)."""

    id: str
    config: AdapterConfig
    lr: float = 2e-2
    gain: float = 0.05
    # the sparse-spectrum forward has two paths: "auto" builds dW on tiny layers, "fast" forces the FFT path
    paths: tuple[str, ...] = ("auto", "fast")


# spectral_r can only rotate and rescale the top-r triplets of a random init, so it moves the loss least
METHOD_CASES = [
    MethodCase("ssh", AdapterConfig(method="ssh", n_coeffs=120, target_modules=TARGETS)),
    MethodCase("ssh_per_layer", AdapterConfig(method="ssh", n_coeffs=120, target_modules=TARGETS, selection="per_layer")),
    MethodCase("ssh_separable", AdapterConfig(method="ssh", n_coeffs=120, target_modules=TARGETS, separable=True,
                                              energy_ratio=0.2)),
    MethodCase("fourierft", AdapterConfig(method="fourierft", n_coeffs=120, target_modules=TARGETS)),
    MethodCase("lora", AdapterConfig(method="lora", lora_rank=4, target_modules=TARGETS)),
    MethodCase("spectral_a", AdapterConfig(method="spectral_a", lora_rank=4, target_modules=TARGETS), 2e-2, 0.1, ("auto",)),
    MethodCase("spectral_r", AdapterConfig(method="spectral_r", lora_rank=8, target_modules=TARGETS), 1e-1, 0.02, ("auto",)),
    MethodCase("smoa", AdapterConfig(method="smoa", lora_rank=4, n_blocks=2, alpha=8, target_modules=TARGETS), 1e-1, 0.1,
               ("auto",)),
]
CASES = {case.id: case for case in METHOD_CASES}


def batch() -> torch.Tensor:
    """The fixed (4, 24) batch of token ids every tiny-model test trains on."""
    return torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int = 8, lr: float = 2e-2) -> list[float]:
    """`steps` AdamW steps of the causal LM loss on `ids`; the losses (the model is left in eval mode)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# --- ZeRO-3 -------------------------------------------------------------------------------------


def zero3_config(lr: float, micro_batch: int = 2) -> dict[str, Any]:
    """A ZeRO-3 DeepSpeed config with torch AdamW; persistence threshold 0: every tiny weight is really
    released after its module's forward, so only the engine's hooks gather it, as on a large model."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


def zero3_tiny_llama(ds_config: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The tiny LLaMA built partitioned under zero.Init, holding the weights `state` (copied in by rank 0)."""
    import deepspeed
    from transformers import LlamaForCausalLM

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(tiny_config())
    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                for key, p in params.items():
                    p.data.copy_(state[f"{prefix}.{key}" if prefix else key])
    return model


@pytest.fixture(scope="module")
def batch8_config(tmp_path_factory) -> Path:
    """zero3.json with a fixed global batch of 8: 1 rank accumulates 2 micro-batches of 4, 2 ranks take 4 each."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config.update(train_batch_size=8, train_micro_batch_size_per_gpu=4)
    config.pop("gradient_accumulation_steps")
    path = tmp_path_factory.mktemp("cfg") / "zero3_batch8.json"
    path.write_text(json.dumps(config))
    return path
