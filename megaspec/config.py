"""The adapter configuration shared by every method (saved as JSON beside each adapter)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclass
class AdapterConfig:
    """What to adapt and how; method-specific fields are ignored by the other methods."""

    method: str = "ssh"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # sparse-spectrum methods (ssh, fourierft, s2ft): coefficients per adapted layer
    n_coeffs: int = 750
    # SSH: fraction of positions chosen by DHT energy of W0 (the rest uniformly at random);
    # 0.5 follows the paper, 0.2 is what the released code effectively does (docs/methods.md §2.2)
    energy_ratio: float = 0.5
    # SSH: "global" ranks energy candidates across all adapted layers (n_coeffs * layers in
    # total, docs/methods.md §2.4); "per_layer" gives every layer exactly n_coeffs
    selection: str = "global"
    # SSH global mode: every layer keeps at least this many energy positions
    min_per_layer: int = 8
    # SSH: True uses the separable cas(u)cas(v) kernel of the released SSH code (docs/methods.md §1.1 b)
    separable: bool = False
    # None: each method's natural default (sqrt(M N) for sparse spectra, alpha/rank for low rank)
    scale: float | None = None
    init: str = "zeros"
    seed: int = 2024
    # low-rank methods (lora, smoa, spectral_a, spectral_r)
    rank: int = 8
    alpha: float = 16.0
    # smoa: number of diagonal blocks
    n_blocks: int = 2
    # s2ft: steps of accumulated gradient used to estimate the coarse update
    s2ft_estimate_steps: int = 4
    s2ft_gamma: float = 1.5

    def to_json(self) -> str:
        """Serialise for saving beside the adapter weights."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        """Inverse of to_json; unknown keys are an error so a typo never passes silently."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown adapter config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, directory: str | Path) -> AdapterConfig:
        """Read adapter_config.json from a saved adapter directory."""
        return cls.from_json((Path(directory) / "adapter_config.json").read_text())
