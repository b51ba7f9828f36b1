"""Sparse-spectrum linear maps: y = x @ dW.T without allocating the M x N update dW (but in tiny layers).

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


# The forward of all three kernels (METHODS.md 1.3): gather the full FFT of x at the columns,
# F[v] = re + i im, mix it into (p, q), and y = Re(IFFT_M(sum_j c_j (p_j + i q_j) e_{u_j})) / N.
#   dht:           p + iq = H[v] - i H[-v],  H[v] = re - im, H[-v] = re + im
#   fourier:       p + iq = conj(F[v])
#   dht_separable: p + iq = H[v] (1 - i)     (cas(theta) = Re((1 - i) e^{i theta}))
def _mix(re: torch.Tensor, im: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel == "fourier":
        return re, -im
    h = re - im
    return h, (-h if kernel == "dht_separable" else -(re + im))


def _mix_adjoint(dp: torch.Tensor, dq: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Transpose of _mix: gradients of (re, im) from gradients of (p, q)."""
    if kernel == "fourier":
        return dp, -dq
    if kernel == "dht_separable":
        d = dp - dq
        return d, -d
    return dp - dq, -(dp + dq)


def _gather_rfft(f: torch.Tensor, idx: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of the full FFT at `idx`, read from a half spectrum (rfft).

    Reads (re, im) pairs along the last axis of the interleaved real view: on a CPU that is ~3x
    faster than index_select over the complex or the (..., 2) axis.
    """
    mirrored = idx > length // 2
    half = torch.where(mirrored, length - idx, idx)
    pairs = torch.stack([2 * half, 2 * half + 1], dim=-1).flatten()
    picked = torch.view_as_real(f).flatten(-2).index_select(-1, pairs).unflatten(-1, (-1, 2))
    sign = 1.0 - 2.0 * mirrored.to(picked.dtype)  # F[v] = conj(F[N - v]) for real input
    return picked[..., 0], picked[..., 1] * sign


def _hermitian_weights(idx: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each z_j lands in the half spectrum and its weights: Re(IFFT(Z)) sees (Z[u] + conj Z[-u]) / 2.

    So z lands at min(u, M - u) as z/2 (u <= M/2) or conj(z)/2; rows with u = -u (DC, Nyquist) keep Re(z).
    """
    upper = idx > length // 2
    self_conj = (idx == 0) | (2 * idx == length)
    w_re = torch.where(self_conj, 1.0, 0.5).to(dtype)
    w_im = torch.where(self_conj, 0.0, torch.where(upper, -0.5, 0.5)).to(dtype)
    return torch.where(upper, length - idx, idx), w_re, w_im


def _scatter_irfft(p: torch.Tensor, q: torch.Tensor, c_re: torch.Tensor, c_im: torch.Tensor, half_idx: torch.Tensor, length: int, out: torch.Tensor) -> None:
    """out = unnormalised inverse rfft (norm="forward") of the half spectrum holding c_re p + i c_im q at half_idx.

    Any 1/length goes into c_re, c_im (n values), not onto the B x length result: one full-size
    scaling less per call.
    """
    values = torch.complex(c_re * p, c_im * q)
    spectrum = torch.zeros(*p.shape[:-1], length // 2 + 1, dtype=values.dtype, device=p.device)
    spectrum.index_add_(-1, half_idx, values)
    torch.fft.irfft(spectrum, n=length, dim=-1, norm="forward", out=out)


# Tokens per pass on a CPU: rows x (M + N) <= CPU_PASS_ELEMENTS, so one pass's input, spectra and
# output (~8 MB) stay in cache and in the allocator's reused heap blocks. Larger passes get fresh
# mmap'd temporaries that page-fault every step: a fixed 256 rows was right at 4096 x 4096 but at
# 8192 x 28672 faulted 743 MB per fwd+bwd (288 MB with 28 rows, the outputs alone) and ran 1.45x slower.
# GPUs take all rows in one pass.
CPU_PASS_ELEMENTS = 1 << 20
MIN_ROWS_PER_PASS = 16


def _row_passes(rows: int, width: int, device: torch.device) -> list[slice]:
    """Slices of at most CPU_PASS_ELEMENTS // width rows (CPU) or all rows (GPU); width = M + N."""
    step = max(MIN_ROWS_PER_PASS, CPU_PASS_ELEMENTS // width) if device.type == "cpu" else max(rows, 1)
    return [slice(start, start + step) for start in range(0, rows, step)]


class _SparseSpectrumLinear(torch.autograd.Function):
    """y = x @ dW.T with a hand-written adjoint: one rfft of the output gradient, gathers, one irfft.

    Autograd through rfft/index ops is exact too but spends most of its time on full-size
    temporaries; this touches (B, n) tensors plus one forward and one inverse FFT each way.
    Saves p, q (B x n each), not x. x arrives as (B, N) rows.
    """

    @staticmethod
    def forward(ctx, x, coeffs, rows, cols, out_features, kernel):  # type: ignore[override]
        n_in, m = x.shape[-1], out_features
        half_rows, w_re, w_im = _hermitian_weights(rows, m, x.dtype)
        c = coeffs / (n_in * m)  # 1/N of the forward, 1/M of the inverse FFT, on n values
        y = x.new_empty(x.shape[0], m)
        p = x.new_empty(x.shape[0], cols.numel())
        q = torch.empty_like(p)
        for part in _row_passes(x.shape[0], n_in + m, x.device):
            p[part], q[part] = _mix(*_gather_rfft(torch.fft.rfft(x[part], dim=-1), cols, n_in), kernel)
            _scatter_irfft(p[part], q[part], c * w_re, c * w_im, half_rows, m, out=y[part])
        ctx.save_for_backward(p, q, coeffs, rows, cols)
        ctx.kernel, ctx.n_in = kernel, n_in
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        p, q, coeffs, rows, cols = ctx.saved_tensors
        m, n_in = grad.shape[-1], ctx.n_in
        want_x, want_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_c = torch.zeros_like(coeffs) if want_c else None
        grad_x = grad.new_empty(grad.shape[0], n_in) if want_x else None
        half_cols, w_re, w_im = _hermitian_weights(cols, n_in, grad.dtype)
        for part in _row_passes(grad.shape[0], n_in + m, grad.device):
            # dL/d(c p) = Re(FFT_M g)[u] / (M N), dL/d(c q) = Im(FFT_M g)[u] / (M N)
            g_re, g_im = _gather_rfft(torch.fft.rfft(grad[part], dim=-1), rows, m)
            g_re, g_im = g_re / (n_in * m), g_im / (n_in * m)  # the 1/M of norm="forward", on n values
            if want_c:
                grad_c += (g_re * p[part] + g_im * q[part]).sum(0)
            if want_x:
                # dL/dx[b] = sum_j (dRe_j cos phi_bj - dIm_j sin phi_bj) = N Re(IFFT_N(dRe + i dIm))
                d_re, d_im = _mix_adjoint(coeffs * g_re, coeffs * g_im, ctx.kernel)
                _scatter_irfft(d_re, d_im, w_re, w_im, half_cols, n_in, out=grad_x[part])
        return grad_x, grad_c, None, None, None, None


# Below this ratio M N / (n + M + N) materialising dW and multiplying beats the FFT path. Measured
# on one CPU thread, fwd+bwd, B = 64 and 2048 tokens (BENCHMARKS.md "fast path or dense"): dense
# wins up to ~62 (64 x 64 and 128 x 128 layers), the FFT path from ~107 (256 x 256 at n <= 100,
# every layer of 512 x 512 and up). Every LLaMA projection (>= 1024 x 2048) is far above it.
DENSE_CROSSOVER = 64


def fast_path_pays(shape: tuple[int, int], n: int) -> bool:
    """Whether the FFT path is cheaper than building the M x N update: M N > DENSE_CROSSOVER (n + M + N)."""
    m, n_in = shape
    return m * n_in > DENSE_CROSSOVER * (n + m + n_in)


def sparse_spectrum_linear(
    x: torch.Tensor,
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    out_features: int,
    kernel: str = "dht",
    path: str = "auto",
) -> torch.Tensor:
    """x @ dW.T for the sparse spectrum (coeffs at rows, cols) of an out_features x N update.

    Exact (float64 agrees with the dense path to ~1e-15); differentiable in x and coeffs
    (first order). Transforms run in fp32 for half-precision x; the result has x's dtype.
    path: "fast" (FFTs, dW never built), "dense" (dW built, then a matmul), or "auto": dense only
    for layers so small that it is cheaper (fast_path_pays), where dW has at most
    DENSE_CROSSOVER (n + M + N) elements.
    """
    _check_kernel(kernel)
    if path not in ("auto", "fast", "dense"):
        raise ValueError(f"unknown path {path!r}; expected 'auto', 'fast' or 'dense'")
    xf = x.to(compute_dtype(x))
    shape = (out_features, x.shape[-1])
    if path == "dense" or (path == "auto" and not fast_path_pays(shape, rows.numel())):
        return (xf @ dense_update(coeffs.to(xf.dtype), rows, cols, shape, kernel).T).to(x.dtype)
    xf = xf.reshape(-1, x.shape[-1])
    y = _SparseSpectrumLinear.apply(xf, coeffs.to(xf.dtype), rows, cols, out_features, kernel)
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)


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
        a = row_ids[start : start + block].long()
        # reduce a*u mod M in integers first: a float angle 2 pi a u / M loses ~1e-3 at 28672 rows
        theta = (2 * math.pi / m) * (torch.outer(a, rows.long()) % m).to(dtype)  # (R, n)
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
    """The M x N update by a full 2-D transform (the dense path: tiny layers, and the reference)."""
    _check_kernel(kernel)
    s = dense_spectrum(coeffs.to(compute_dtype(coeffs)), rows, cols, shape)
    if kernel == "fourier":
        return torch.fft.ifft2(s).real
    return idht2(s, separable=kernel == "dht_separable")
