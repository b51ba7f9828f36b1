"""LoRA (Hu et al. 2021), the baseline: dW = (alpha / r) B A, A Kaiming-uniform, B zero (as peft)."""

from __future__ import annotations

import math

import torch
from torch import nn

from megaspec.adapters.base import Adapter, layer_generator
from megaspec.config import AdapterConfig


class LoRAAdapter(Adapter):
    method = "lora"

    @classmethod
    def check_config(cls, config: AdapterConfig, shape: tuple[int, int], name: str) -> None:
        if config.lora_rank <= 0:
            raise ValueError(f"lora_rank={config.lora_rank} must be positive for lora")

    def default_scale(self) -> float:
        return self.config.alpha / self.config.lora_rank

    def init_parameters(self) -> None:
        r = self.config.lora_rank

        def kaiming() -> torch.Tensor:
            a = torch.empty(r, self.in_features)
            return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=layer_generator(self.config.seed, self.name))

        self.lora_A = self.new_parameter(kaiming, (r, self.in_features))
        self.lora_B = self.new_parameter(lambda: torch.zeros(self.out_features, r), (self.out_features, r))
        self.scale = self.resolved_scale()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        return (x @ self.lora_A.T) @ (self.lora_B.T * self.scale)

    def delta_weight(self, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        b = self.lora_B.detach().float()
        if row_ids is not None:
            b = b[row_ids]
        return (b @ self.lora_A.detach().float()) * self.scale

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B.detach().double().cpu() * self.scale, self.lora_A.detach().double().cpu()
