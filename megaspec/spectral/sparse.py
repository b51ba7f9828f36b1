"""Sparse-spectrum linear maps: y = x @ dW.T without ever allocating the M x N update dW.

A sparse spectrum holds n real coefficients c_j at (row frequency u_j, column frequency v_j).
Three kernels are supported (METHODS.md 1.2):

    "dht"           dW = DHT2(S)/(MN)            true 2-D Hartley (SSH)
    "dht_separable" dW = DHT2_sep(S)/(MN)        separable Hartley (SSH's released code)
    "fourier"       dW = Re(IFFT2(S))            FourierFT (HF peft)

The fast forward (DESIGN.md "key math", METHODS.md 1.3) uses one real FFT of each token, a gather
of n columns, a scatter of n rows and one inverse real FFT: O(B (M + N) log) per layer.
"""

from __future__ import annotations

import math

import torch

from megaspec.spectral.transforms import compute_dtype, dht, idht2

KERNELS = ("dht", "dht_separable", "fourier")


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown spectral kernel {kernel!r}; expected one of {KERNELS}")


def _gather_rfft(f: torch.Tensor, cols: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of the full FFT at `cols`, read from a half spectrum (rfft)."""
    mirrored = cols > length // 2
    idx = torch.where(mirrored, length - cols, cols)
    picked = f.index_select(-1, idx)
    sign = 1.0 - 2.0 * mirrored.to(picked.real.dtype)  # conj(F[N - v]) = F[v] for real input
    return picked.real, picked.imag * sign


def _scatter_irfft(z_re: torch.Tensor, z_im: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """Re(IFFT_M(Z)) for Z = sum_j z_j e_{u_j}, through a half spectrum and one irfft.

    Re(IFFT(Z)) only sees the Hermitian part (Z[u] + conj Z[-u]) / 2, so each z_j lands at
    min(u, M - u) as z/2 or conj(z)/2; rows with u = -u (DC, Nyquist) keep Re(z).
    """
    half = length // 2
    upper = rows > half
    idx = torch.where(upper, length - rows, rows)
    self_conj = (rows == 0) | (2 * rows == length)
    w_re = torch.where(self_conj, 1.0, 0.5).to(z_re.dtype)
    w_im = torch.where(self_conj, 0.0, torch.where(upper, -0.5, 0.5)).to(z_re.dtype)
    spectrum = torch.zeros(*z_re.shape[:-1], half + 1, dtype=z_re.dtype, device=z_re.device)
    spec_re = spectrum.index_add(-1, idx, z_re * w_re)
    spec_im = spectrum.index_add(-1, idx, z_im * w_im)
    return torch.fft.irfft(torch.complex(spec_re, spec_im), n=length, dim=-1)


def sparse_spectrum_linear(
    x: torch.Tensor,
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    out_features: int,
    kernel: str = "dht",
) -> torch.Tensor:
    """x @ dW.T for the sparse spectrum (coeffs at rows, cols) of an out_features x N update.

    Exact (float64 agrees with the dense path to ~1e-15); differentiable in x and coeffs.
    Transforms run in fp32 for half-precision x; the result has x's dtype.
    """
    _check_kernel(kernel)
    m, n_in = out_features, x.shape[-1]
    xf = x.to(compute_dtype(x))
    c = coeffs.to(xf.dtype)
    f = torch.fft.rfft(xf, dim=-1)
    re, im = _gather_rfft(f, cols, n_in)
    if kernel == "dht_separable":
        # Z[:, u] += c H[:, v] (real), then y = DHT_M(Z)/(MN)  (METHODS.md 1.3 variant b)
        h = (re - im) * c
        z = torch.zeros(*h.shape[:-1], m, dtype=h.dtype, device=h.device).index_add(-1, rows, h)
        return (dht(z, dim=-1) / (m * n_in)).to(x.dtype)
    if kernel == "dht":
        # P = c H[v], Q = c H[-v], Z = P - iQ  with H[v] = Re F - Im F, H[-v] = Re F + Im F
        z_re, z_im = c * (re - im), -c * (re + im)
    else:
        # FourierFT: Z = c conj(F[v])
        z_re, z_im = c * re, -c * im
    return (_scatter_irfft(z_re, z_im, rows, m) / n_in).to(x.dtype)


def sparse_spectrum_rows(
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    shape: tuple[int, int],
    row_ids: torch.Tensor | None = None,
    kernel: str = "dht",
    block: int = 256,
) -> torch.Tensor:
    """Rows `row_ids` (default all) of the dense update dW, one length-N transform per row.

    METHODS.md 1.4: A_a[v] = sum_{v_j = v} c_j cos(theta_aj), B_a[v] = sum c_j sin(theta_aj);
    dW[a] = DHT_N(A_a + R B_a)/(MN) (R reverses v -> -v), or N Re(IFFT_N(A_a + i B_a))/(MN) for
    FourierFT. Memory is O(block * (n + N)): merging a sharded or quantized base never needs the
    full M x N update on one rank.
    """
    _check_kernel(kernel)
    m, n_in = shape
    dtype = compute_dtype(coeffs)
    c = coeffs.to(dtype)
    if row_ids is None:
        row_ids = torch.arange(m, device=c.device)
    neg_cols = (n_in - cols) % n_in
    out = []
    for start in range(0, row_ids.numel(), block):
        a = row_ids[start : start + block].to(dtype)
        theta = (2 * math.pi / m) * torch.outer(a, rows.to(dtype))  # (R, n)
        zeros = torch.zeros(a.numel(), n_in, dtype=dtype, device=c.device)
        if kernel == "dht_separable":
            amp = zeros.index_add(-1, cols, c * (torch.cos(theta) + torch.sin(theta)))
            out.append(dht(amp, dim=-1))
            continue
        amp_cos = zeros.index_add(-1, cols, c * torch.cos(theta))
        if kernel == "dht":
            out.append(dht(amp_cos + zeros.index_add(-1, neg_cols, c * torch.sin(theta)), dim=-1))
        else:
            amp_sin = zeros.index_add(-1, cols, c * torch.sin(theta))
            out.append(n_in * torch.fft.ifft(torch.complex(amp_cos, amp_sin), dim=-1).real)
    return torch.cat(out, dim=0) / (m * n_in)


def dense_spectrum(coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense M x N spectrum S with coeffs scattered at (rows, cols); repeated positions add."""
    s = torch.zeros(shape[0] * shape[1], dtype=coeffs.dtype, device=coeffs.device)
    return s.index_add(0, rows * shape[1] + cols, coeffs).view(shape)


def dense_update(
    coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], kernel: str = "dht"
) -> torch.Tensor:
    """The M x N update by a full 2-D transform (the dense path: reference and benchmark only)."""
    _check_kernel(kernel)
    s = dense_spectrum(coeffs.to(compute_dtype(coeffs)), rows, cols, shape)
    if kernel == "fourier":
        return torch.fft.ifft2(s).real
    return idht2(s, separable=kernel == "dht_separable")
