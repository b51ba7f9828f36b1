"""Pure spectral math: transforms, sparse-spectrum operators. No module state, no distributed code."""

from megaspec.spectral.sparse import (
    KERNELS,
    dense_spectrum,
    dense_update,
    sparse_spectrum_linear,
    sparse_spectrum_rows,
)
from megaspec.spectral.transforms import dht, dht2, dht2_energy, dht2_energy_topk, idht2

__all__ = [
    "KERNELS",
    "dense_spectrum",
    "dense_update",
    "dht",
    "dht2",
    "dht2_energy",
    "dht2_energy_topk",
    "idht2",
    "sparse_spectrum_linear",
    "sparse_spectrum_rows",
]
