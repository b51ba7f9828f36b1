"""Discrete Hartley transforms via the FFT (METHODS.md 1.1), fp32 inside for half-precision input."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """torch.fft has no bf16 kernels: transform half precision in fp32, keep fp32/fp64 as they are."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def dht(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unnormalised 1-D DHT, H[k] = sum_n x[n] cas(2 pi k n / N) = Re(FFT x) - Im(FFT x)."""
    f = torch.fft.fft(x.to(compute_dtype(x)), dim=dim)
    return (f.real - f.imag).to(x.dtype)


def dht2(x: torch.Tensor, separable: bool = False) -> torch.Tensor:
    """Unnormalised 2-D DHT over the last two dims.

    separable=False is the true (non-separable) kernel cas(2 pi (k m / M + l n / N));
    separable=True is rows-then-columns, cas(2 pi k m / M) cas(2 pi l n / N), as in SSH's code.
    """
    xf = x.to(compute_dtype(x))
    if separable:
        return dht(dht(xf, dim=-1), dim=-2).to(x.dtype)
    f = torch.fft.fft2(xf)
    return (f.real - f.imag).to(x.dtype)


def idht2(spectrum: torch.Tensor, separable: bool = False) -> torch.Tensor:
    """Inverse 2-D DHT: the DHT is an involution up to M*N."""
    m, n = spectrum.shape[-2:]
    return dht2(spectrum, separable=separable) / (m * n)


def dht2_energy(weight: torch.Tensor, separable: bool = False) -> torch.Tensor:
    """Ortho-normalised DHT energy H^2/(M N); by Parseval it sums to ||W||_F^2 (METHODS.md 2.4)."""
    m, n = weight.shape[-2:]
    h = dht2(weight.to(compute_dtype(weight)), separable=separable)
    return h.square() / (m * n)
