"""Sparse-spectrum linear maps: y = x @ dW.T without allocating the M x N update dW (but in tiny layers).

A sparse spectrum holds n real coefficients c_j at (row frequency u_j, column frequency v_j).
Three kernels are supported (docs/methods.md §1.2):

    "dht"           dW = DHT2(S)/(MN)            true 2-D Hartley (SSH)
    "dht_separable" dW = DHT2_sep(S)/(MN)        separable Hartley (SSH's released code)
    "fourier"       dW = Re(IFFT2(S))            FourierFT (HF peft)

The fast forward (docs/design.md "Key math", docs/methods.md §1.3) uses one real FFT of each token, a gather
of n columns, a scatter of n rows and one inverse real FFT: O(B (M + N) log) per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megaspec.spectral.transforms import compute_dtype, dht, idht2

KERNELS = ("dht", "dht_separable", "fourier")


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown spectral kernel {kernel!r}; expected one of {KERNELS}")


# The forward of all three kernels (docs/methods.md §1.3): gather the full FFT of x at the columns,
# F[v] = re + i im, mix it into (p, q), and y = Re(IFFT_M(sum_j c_j (p_j + i q_j) e_{u_j})) / N.
#   dht:           p + iq = H[v] - i H[-v],  H[v] = re - im, H[-v] = re + im
#   fourier:       p + iq = conj(F[v])
#   dht_separable: p + iq = H[v] (1 - i)     (cas(theta) = Re((1 - i) e^{i theta}))
# As a matrix on the last axis: (p, q) = (re, im) @ MIX[kernel]; its adjoint is @ MIX[kernel].T.
MIX = {
    "dht": ((1.0, -1.0), (-1.0, -1.0)),
    "fourier": ((1.0, 0.0), (0.0, -1.0)),
    "dht_separable": ((1.0, -1.0), (-1.0, 1.0)),
}


def _read_pairs(idx: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the full FFT at `idx` sits in the interleaved (re, im) view of a half spectrum, and its signs.

    F[v] = conj(F[length - v]) for real input, so a mirrored v reads the conjugate: sign (1, -1).
    Reading pairs along the last axis is ~3x faster on a CPU than index_select over a complex axis.
    """
    mirrored = idx > length // 2
    half = torch.where(mirrored, length - idx, idx)
    pairs = torch.cat([2 * half, 2 * half + 1])  # all re offsets, then all im offsets: (re, im) planes
    signs = torch.stack([torch.ones_like(half, dtype=dtype), 1.0 - 2.0 * mirrored.to(dtype)], dim=-1)
    return pairs, signs


def _hermitian_weights(idx: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each z_j lands in the half spectrum and its (re, im) weights: Re(IFFT(Z)) sees (Z[u] + conj Z[-u]) / 2.

    So z lands at min(u, M - u) as z/2 (u <= M/2) or conj(z)/2; rows with u = -u (DC, Nyquist) keep Re(z).
    """
    upper = idx > length // 2
    self_conj = (idx == 0) | (2 * idx == length)
    w_re = torch.where(self_conj, 1.0, 0.5).to(dtype)
    w_im = torch.where(self_conj, 0.0, torch.where(upper, -0.5, 0.5)).to(dtype)
    return torch.where(upper, length - idx, idx), torch.stack([w_re, w_im], dim=-1)


@dataclass(frozen=True)
class SpectrumIndex:
    """What the fast path needs that depends only on the positions, the shape and the dtype.

    Built once per plan (SparseSpectrumAdapter caches it), so a training step launches only the
    transforms, two gathers, two scatters and a few (B, n) products per layer: on a GPU each of
    the ~60 small index ops it replaces costs a kernel launch per layer and step.

    A gather reads (re_h, im_h) of the half spectrum as two (rows, n) planes; the full FFT there is
    (re_h, s im_h), s = -1 where the position is read mirrored. Mixing into (p, q) is (re, im) @ MIX,
    written as re_h * from_re + im_h * from_im with s and MIX folded into those (2, n) planes:
    elementwise over contiguous n. (A K = 2 matmul, and (rows, n, 2) pairs broadcast against (n, 2),
    whose inner loops have length 2, were both slower on a CPU: `python launch/bench.py crossover`.)
    """

    col_pairs: torch.Tensor  # (2n,) gather F_N[v_j] from view_as_real(rfft_N(x)).flatten(-2)
    fwd_from_re: torch.Tensor  # (2, n): pq' = re_h * fwd_from_re + im_h * fwd_from_im = (p, s_u q) / (M N)
    fwd_from_im: torch.Tensor
    row_pairs: torch.Tensor  # (2n,) gather F_M[u_j] from the output gradient's rfft (backward)
    bwd_from_re: torch.Tensor  # (2, n): (dRe, dIm) = g_re_h * bwd_from_re + g_im_h * bwd_from_im, MIX^T and 1/(M N) in
    bwd_from_im: torch.Tensor
    row_half: torch.Tensor  # (n,) scatter into the half spectrum of length M (forward)
    row_weights: torch.Tensor  # (2, n) Hermitian weights over (1, s_u) / (M N): c pq' row_weights = c (w_re p, w_im q)
    col_half: torch.Tensor  # (n,) scatter into the half spectrum of length N (input gradient)
    col_weights: torch.Tensor  # (2, n)
    shape: tuple[int, int]
    kernel: str
    dtype: torch.dtype


def spectrum_index(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], kernel: str = "dht",
                   dtype: torch.dtype = torch.float32) -> SpectrumIndex:
    """The SpectrumIndex of coefficients at (rows, cols) of an (M, N) update, for transforms in `dtype`."""
    _check_kernel(kernel)
    m, n_in = shape
    col_pairs, col_signs = _read_pairs(cols, n_in, dtype)
    row_pairs, row_signs = _read_pairs(rows, m, dtype)
    row_half, row_weights = _hermitian_weights(rows, m, dtype)
    col_half, col_weights = _hermitian_weights(cols, n_in, dtype)
    mix = torch.tensor(MIX[kernel], dtype=dtype, device=rows.device)
    # pq' carries the output side's (1, s_u) / (M N), so that dL/dc = sum over tokens and (re, im) of
    # g_h * pq' (g_h: the gathered half spectrum of FFT_M(grad)) in two ops; the forward undoes it in
    # row_weights (s_u = +-1)
    unit = row_signs / (m * n_in)
    planes = [col_signs[:, :1] * mix[0] * unit, col_signs[:, 1:] * mix[1] * unit, unit[:, :1] * mix[:, 0], unit[:, 1:] * mix[:, 1],
              row_weights * row_signs, col_weights]  # (n, 2) each, stored as (2, n)
    fwd_re, fwd_im, bwd_re, bwd_im, row_w, col_w = (t.T.contiguous() for t in planes)
    return SpectrumIndex(col_pairs, fwd_re, fwd_im, row_pairs, bwd_re, bwd_im, row_half, row_w, col_half, col_w,
                         (m, n_in), kernel, dtype)


def _gather(f: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(rows, 2, n): the (re, im) planes of the half spectrum f at the pairs' positions."""
    return torch.view_as_real(f).flatten(-2).index_select(-1, pairs).unflatten(-1, (2, -1))


def _combine(h: torch.Tensor, from_re: torch.Tensor, from_im: torch.Tensor) -> torch.Tensor:
    """(rows, 2, n) = re plane * from_re + im plane * from_im (from_*: (2, n)): a per-coefficient 2 x 2 map."""
    return torch.addcmul(h[..., :1, :] * from_re, h[..., 1:, :], from_im)


def _scatter_irfft(planes: torch.Tensor, half_idx: torch.Tensor, length: int) -> torch.Tensor:
    """Unnormalised inverse rfft (norm="forward") of the half spectrum holding re + i im of `planes` (rows, 2, n) at half_idx.

    The 1/length of the transform is folded into the n weights of `planes` by SpectrumIndex.
    """
    spectrum = torch.zeros(*planes.shape[:-2], length // 2 + 1, dtype=planes.dtype.to_complex(), device=planes.device)
    spectrum.index_add_(-1, half_idx, torch.complex(planes[..., 0, :], planes[..., 1, :]))
    return torch.fft.irfft(spectrum, n=length, dim=-1, norm="forward")


# Tokens per pass on a CPU: rows x (M + N + 2n) <= CPU_PASS_ELEMENTS, and 16 to 256 rows, so one
# pass's input, spectra, (rows, 2, n) gathers and output stay in cache and in the allocator's reused
# heap blocks. Larger passes get fresh mmap'd temporaries that page-fault every step (a fixed 256
# rows did so at 8192 x 28672); without the 256 cap and the n term, small layers with large n ran
# several times slower (`python launch/bench.py crossover`, BENCHMARKS.md "fast path or dense").
# GPUs take all rows in one pass.
CPU_PASS_ELEMENTS = 1 << 20
MIN_ROWS_PER_PASS, MAX_ROWS_PER_PASS = 16, 256


def _row_passes(rows: int, width: int, device: torch.device) -> list[slice]:
    """Slices of CPU_PASS_ELEMENTS // width rows within [MIN, MAX]_ROWS_PER_PASS (CPU), or all rows (GPU); width = M + N + 2n."""
    if device.type == "cpu":
        step = min(MAX_ROWS_PER_PASS, max(MIN_ROWS_PER_PASS, CPU_PASS_ELEMENTS // width))
    else:
        step = max(rows, 1)
    return [slice(start, start + step) for start in range(0, rows, step)]


class _SparseSpectrumLinear(torch.autograd.Function):
    """y = x @ dW.T with a hand-written adjoint: one rfft of the output gradient, gathers, one irfft.

    Autograd through rfft/index ops is exact too but spends most of its time on full-size
    temporaries; this touches (B, n) tensors plus one forward and one inverse FFT each way.
    Saves pq' = (p, s_u q) / (M N) (B x 2 x n), not x. x arrives as (B, N) rows.
    """

    @staticmethod
    def forward(ctx, x, coeffs, index):  # type: ignore[override]
        m, n_in = index.shape
        rows = x.shape[0]
        passes = _row_passes(rows, m + n_in + 2 * coeffs.numel(), x.device)
        weights = coeffs * index.row_weights  # (2, n): c_j pq' weights = c_j (w_re p, w_im q) / (M N)
        # one pass (a GPU) keeps its results as they are; several, or none (no tokens), fill preallocated outputs
        one = len(passes) == 1
        pq, y = (None, None) if one else (x.new_empty(rows, 2, coeffs.numel()), x.new_empty(rows, m))
        for part in passes:
            part_pq = _combine(_gather(torch.fft.rfft(x[part], dim=-1), index.col_pairs), index.fwd_from_re, index.fwd_from_im)
            part_y = _scatter_irfft(part_pq * weights, index.row_half, m)
            if one:
                pq, y = part_pq, part_y
            else:
                pq[part], y[part] = part_pq, part_y
        ctx.save_for_backward(pq, coeffs)
        ctx.index = index
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pq, coeffs = ctx.saved_tensors
        index = ctx.index
        m, n_in = index.shape
        want_x, want_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        passes = _row_passes(grad.shape[0], n_in + m + 2 * coeffs.numel(), grad.device)
        one = len(passes) == 1
        grad_c = torch.zeros_like(coeffs) if want_c and not one else None
        grad_x = grad.new_empty(grad.shape[0], n_in) if want_x and not one else None
        if want_x:  # per call: the coefficients and the input-side Hermitian weights folded in, (2, n) each
            weights = coeffs * index.col_weights
            from_re, from_im = index.bwd_from_re * weights, index.bwd_from_im * weights
        for part in passes:
            g = _gather(torch.fft.rfft(grad[part], dim=-1), index.row_pairs)  # half spectrum of FFT_M(grad) at u
            if want_c:
                # dL/dc_j = sum_b (p g_re + q g_im)[b, j], (g_re, g_im) = FFT_M(grad)[u_j] / (M N) = g_h (1, s_u) / (M N)
                part_c = (g * pq[part]).sum((0, 1))
                grad_c = part_c if one else grad_c.add_(part_c)
            if want_x:
                # dL/dx[b] = sum_j (dRe_j cos phi_bj - dIm_j sin phi_bj) = N Re(IFFT_N(dRe + i dIm))
                part_x = _scatter_irfft(_combine(g, from_re, from_im), index.col_half, n_in)
                if one:
                    grad_x = part_x
                else:
                    grad_x[part] = part_x
        return grad_x, grad_c, None


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
    index: SpectrumIndex | None = None,
) -> torch.Tensor:
    """x @ dW.T for the sparse spectrum (coeffs at rows, cols) of an out_features x N update.

    Exact (float64 agrees with the dense path to ~1e-15); differentiable in x and coeffs
    (first order). Transforms run in fp32 for half-precision x; the result has x's dtype.
    path: "fast" (FFTs, dW never built), "dense" (dW built, then a matmul), or "auto": dense only
    for layers so small that it is cheaper (fast_path_pays), where dW has at most
    DENSE_CROSSOVER (n + M + N) elements. index: spectrum_index(rows, cols, ...) for this layer and
    compute dtype, if the caller keeps one (it must match rows, cols and kernel); else built here.
    """
    _check_kernel(kernel)
    if path not in ("auto", "fast", "dense"):
        raise ValueError(f"unknown path {path!r}; expected 'auto', 'fast' or 'dense'")
    xf = x.to(compute_dtype(x))
    shape = (out_features, x.shape[-1])
    if path == "dense" or (path == "auto" and not fast_path_pays(shape, rows.numel())):
        return (xf @ dense_update(coeffs.to(xf.dtype), rows, cols, shape, kernel).T).to(x.dtype)
    if index is None:
        index = spectrum_index(rows, cols, shape, kernel, xf.dtype)
    elif (index.shape, index.kernel, index.dtype) != (shape, kernel, xf.dtype) or index.row_half.numel() != rows.numel():
        raise ValueError(f"spectrum index of {index.row_half.numel()} {index.kernel} positions in a {index.shape} {index.dtype} "
                         f"layer used for {rows.numel()} {kernel} positions in a {shape} {xf.dtype} one: rebuild it with spectrum_index")
    xf = xf.reshape(-1, x.shape[-1])
    y = _SparseSpectrumLinear.apply(xf, coeffs.to(xf.dtype), index)
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

    docs/methods.md §1.4: A_a[v] = sum_{v_j = v} c_j cos(theta_aj), B_a[v] = sum c_j sin(theta_aj);
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


# --- exact low-rank factors (docs/methods.md §1.3, "explicit bases") -----------------------------
#
#     cas(t + p) = cos t cas p + sin t cas(-p)          (SSH, "dht")
#     cos(t + p) = cos t cos p - sin t sin p            (FourierFT, "fourier")
#     cas t cas p                                       (SSH's released code, "dht_separable")
#
# so dW = Cos_u diag(c) G1_v^T + Sin_u diag(c) G2_v^T has rank <= 2 * #distinct(u). Positions with
# the same row frequency share their Cos/Sin columns, and so do u and -u (cos is even, sin is odd),
# so grouping gives rank <= 2 * #distinct(min(u, M - u)); the same holds by columns, and the
# smaller of the two is taken.


def _fold(freq: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(f, size - f), +1 or -1): cos of the two frequencies agree, sin flips sign."""
    folded = torch.minimum(freq, (size - freq) % size)
    return folded, torch.where(freq == folded, 1.0, -1.0).double()


def _group_by_rows(
    coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (B, A) of the sparse-spectrum update with one (or two) columns of B per distinct row frequency."""
    m, n = shape
    c = coeffs.double()
    a_idx = torch.arange(m, dtype=torch.float64)
    phi = (2 * math.pi / n) * torch.outer(cols.double(), torch.arange(n, dtype=torch.float64))  # (n_coeffs, N)
    if kernel == "dht_separable":
        classes, which = torch.unique(rows, return_inverse=True)
        theta = (2 * math.pi / m) * torch.outer(a_idx, classes.double())
        right = torch.zeros(classes.numel(), n, dtype=torch.float64).index_add_(0, which, c[:, None] * (phi.cos() + phi.sin()))
        return theta.cos() + theta.sin(), right / (m * n)
    folded, sign = _fold(rows, m)
    classes, which = torch.unique(folded, return_inverse=True)
    if kernel == "dht":  # cas(t + p) = cos t cas p + sin t cas(-p)
        g1, g2 = phi.cos() + phi.sin(), phi.cos() - phi.sin()
    else:  # cos(t + p) = cos t cos p - sin t sin p
        g1, g2 = phi.cos(), -phi.sin()
    zeros = torch.zeros(classes.numel(), n, dtype=torch.float64)
    right_cos = zeros.index_add(0, which, c[:, None] * g1)
    right_sin = zeros.index_add(0, which, (c * sign)[:, None] * g2)
    theta = (2 * math.pi / m) * torch.outer(a_idx, classes.double())
    has_sin = (classes != 0) & (2 * classes != m)  # sin(2 pi a u / M) vanishes for u = 0 and u = M/2
    left = torch.cat([theta.cos(), theta.sin()[:, has_sin]], dim=1)
    right = torch.cat([right_cos, right_sin[has_sin]], dim=0)
    return left, right / (m * n)


def spectrum_factors(
    coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 (B, A) of dW = kernel-transform(S)/(M N), grouped by rows or by columns, whichever is smaller.

    The kernels are symmetric in (row, column), so grouping by columns is grouping the rows of dW^T.
    """
    if kernel not in ("dht", "dht_separable", "fourier"):
        raise ValueError(f"unknown spectral kernel {kernel!r}")
    rows, cols = rows.long().cpu(), cols.long().cpu()
    by_rows = _group_by_rows(coeffs.cpu(), rows, cols, shape, kernel)
    by_cols_t = _group_by_rows(coeffs.cpu(), cols, rows, (shape[1], shape[0]), kernel)
    if by_cols_t[0].shape[1] < by_rows[0].shape[1]:
        return by_cols_t[1].T, by_cols_t[0].T
    return by_rows
