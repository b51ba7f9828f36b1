"""FourierFT (Gao et al., ICML 2024) as in HF peft: random positions, dW = scale * Re(IFFT2(S)).

Positions follow peft exactly: randperm(M*N, seed)[:n], the same seed for every layer (so
layers of one shape share positions), flat index f -> (f // N, f % N). peft's default scale is
150; megaspec's default is sqrt(M N) (see ortho_scale); pass `scale` for parity. Training uses
the fast sparse-spectrum forward instead of peft's dense ifft2 + matmul.
"""

from __future__ import annotations

import torch

from megaspec.adapters.base import Plan
from megaspec.adapters.sparse_spectrum import SparseSpectrumAdapter, positions_plan


class FourierFTAdapter(SparseSpectrumAdapter):
    method = "fourierft"
    kernel = "fourier"

    def local_plan(self, result: object) -> Plan:
        m, n = self.shape
        count = self.config.n_coeffs
        flat = torch.randperm(m * n, generator=torch.Generator().manual_seed(self.config.seed))[:count]
        return positions_plan(flat, n)
