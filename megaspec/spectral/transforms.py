"""Discrete Hartley transforms via the FFT (docs/methods.md §1.1), fp32 inside for half-precision input."""

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
    """Ortho-normalised DHT energy H^2/(M N); by Parseval it sums to ||W||_F^2 (docs/methods.md §2.4)."""
    m, n = weight.shape[-2:]
    h = dht2(weight.to(compute_dtype(weight)), separable=separable)
    return h.square() / (m * n)


def dht2_energy_topk(weight: torch.Tensor, k: int, separable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest ortho-normalised DHT energies of a real M x N weight and their flat positions.

    Sorted by energy descending, ties by position. For the true 2-D DHT one rfft2 gives both halves:
    with F = FFT2(W), H[k, l] = Re F - Im F and H[-k, -l] = Re F + Im F, so peak memory is the
    weight plus about twice its size (docs/methods.md §1.1), not the full complex FFT2 and its copies.
    """
    m, n = weight.shape
    w = weight.to(compute_dtype(weight))
    if separable:
        energy = dht2(w, separable=True).square_().div_(m * n).flatten()
        scores, positions = torch.topk(energy, min(k, energy.numel()))
        return _by_score_then_position(scores, positions, k)
    f = torch.fft.rfft(w, dim=-1)  # (M, N/2 + 1): the size of the weight
    half = f.shape[-1]
    for start in range(0, half, _COLUMN_BLOCK):  # finish FFT2 in place, a block of columns at a time
        f[:, start : start + _COLUMN_BLOCK] = torch.fft.fft(f[:, start : start + _COLUMN_BLOCK], dim=0)
    pairs = torch.view_as_real(f)  # energies overwrite (Re F, Im F) in place: no extra copy
    rows = torch.arange(m, device=w.device)
    candidates = []
    for start in range(0, m, _ROW_BLOCK):
        block = pairs[start : start + _ROW_BLOCK]
        re, im = block[..., 0], block[..., 1]
        plus = (re - im).square_().div_(m * n)  # H[k, l]^2 / (MN), l in [0, N/2]
        im.add_(re).square_().div_(m * n)  # H[-k, -l]^2 / (MN)
        minus = im
        minus[:, 0] = -1.0  # l = 0 and (even N) l = N/2 mirror onto columns `plus` already holds
        if n % 2 == 0:
            minus[:, n // 2] = -1.0
        for energy, mirrored in ((plus, False), (minus.contiguous(), True)):
            scores, idx = torch.topk(energy.flatten(), min(k, energy.numel()))
            u, v = idx // half + start, idx % half
            if mirrored:
                u, v = (m - rows[u]) % m, (n - v) % n
            candidates.append((scores, u * n + v))
        if len(candidates) > 8:  # keep the running candidate set O(k)
            merged = _by_score_then_position(*_concat(candidates), k)
            candidates = [merged]
    del f, pairs
    scores, positions = _concat(candidates)
    keep = scores >= 0
    return _by_score_then_position(scores[keep], positions[keep], k)


_COLUMN_BLOCK = 256
_ROW_BLOCK = 1024


def _concat(candidates: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([c[0] for c in candidates]), torch.cat([c[1] for c in candidates])


def _by_score_then_position(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k by (score descending, position ascending): a tie order independent of the FFT layout."""
    order = torch.argsort(positions, stable=True)
    scores, positions = scores[order], positions[order]
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return scores[order], positions[order]
