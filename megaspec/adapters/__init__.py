"""One module per method behind the Adapter interface, and the registry that names them."""

from megaspec.adapters.base import Adapter, dense_weight, is_quantized, linear_shape
from megaspec.adapters.fourierft import FourierFTAdapter
from megaspec.adapters.lora import LoRAAdapter
from megaspec.adapters.s2ft import S2FTAdapter
from megaspec.adapters.smoa import SMoAAdapter
from megaspec.adapters.spectral_adapter import SpectralAdditiveAdapter, SpectralRotationAdapter
from megaspec.adapters.ssh import SSHAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    cls.method: cls
    for cls in (SSHAdapter, FourierFTAdapter, S2FTAdapter, LoRAAdapter, SMoAAdapter, SpectralAdditiveAdapter, SpectralRotationAdapter)
}


def adapter_class(method: str) -> type[Adapter]:
    """The adapter class registered under `method`, or one clear error listing the known ones."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[method]


__all__ = ["ADAPTERS", "Adapter", "adapter_class", "dense_weight", "is_quantized", "linear_shape"]
