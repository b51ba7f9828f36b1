"""megaspec: spectral-domain fine-tuning of LLaMA-class models under DeepSpeed ZeRO-3."""

from megaspec.config import AdapterConfig
from megaspec.model import (
    AdapterSummary,
    apply_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_parameter_count,
)

__all__ = [
    "AdapterConfig",
    "AdapterSummary",
    "apply_adapters",
    "load_adapter",
    "merge_adapters",
    "save_adapter",
    "trainable_parameter_count",
]
__version__ = "0.1.0"
