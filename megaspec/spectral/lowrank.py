"""Pure low-rank / SVD math for Spectral Adapter (^A, ^R) and SMoA (docs/methods.md §5, 6).

Every SVD runs in float64 whatever the input dtype: the top factors and the coordinate scores are
then far more accurate than the fp32 weight they come from, so rounding noise does not decide a
sign or an ordering, and one process and many ranks (which run the same code on the same gathered
weight) agree bit-for-bit.
"""

from __future__ import annotations

import torch


def canonical_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (u_j, v_j) so that the largest-|.| entry of u_j is positive.

    Singular vectors are unique only up to a joint sign; this fixes it (ties in |.| go to the
    first index, as argmax does), so a plan never depends on the LAPACK/cuSOLVER build.
    """
    pivot = u.abs().argmax(dim=0)
    sign = torch.sign(u[pivot, torch.arange(u.shape[1], device=u.device)])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, v * sign


def top_singular(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U1, S1, V1) of the top-`rank` SVD W = U S V^T: U1 is M x r, S1 is r (descending), V1 is N x r.

    float64 thin SVD (torch.linalg.svd, full_matrices=False), canonical signs, returned as float32.
    """
    m, n = weight.shape
    if not 0 < rank <= min(m, n):
        raise ValueError(f"rank={rank} must be in 1..{min(m, n)} for a {m}x{n} weight")
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    u1, v1 = canonical_signs(u[:, :rank], vh[:rank].T)
    return u1.float().contiguous(), s[:rank].float().contiguous(), v1.float().contiguous()


def cayley(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q = (I - K)(I + K)^{-1} with the skew part K = (X - X^T)/2 of a square X.

    I + K is invertible for skew K, and (I - K), (I + K)^{-1} commute (both are functions of K), so
    Q = (I + K)^{-1}(I - K) is one linear solve. X = 0 gives Q = I exactly.
    """
    k = (x - x.T) / 2
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye + k, eye - k)


def spectral_index_scores(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SMoA's coordinate scores: the energy-weighted mean singular index of each row and column.

    With W = U diag(s) V^T (float64 thin SVD) and j = 0, 1, ... the singular index:
        row i:    sum_j U[i,j]^2 s_j^2 j / sum_j U[i,j]^2 s_j^2
        column b: sum_j V[b,j]^2 s_j^2 j / sum_j V[b,j]^2 s_j^2
    (misonsky/SMoA cpeft/tuners/smoa.py as read in docs/methods.md §5; a 1-based j only shifts every score
    by one). The denominators are the squared row/column norms of W; an all-zero row or column
    scores 0 (its denominator is clamped to the smallest positive float64).
    """
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    energy = s.square()
    index = torch.arange(s.numel(), dtype=torch.float64, device=s.device)
    tiny = torch.finfo(torch.float64).tiny

    def score(vectors: torch.Tensor) -> torch.Tensor:
        w = vectors.square()
        return (w @ (energy * index)) / (w @ energy).clamp_min(tiny)

    return score(u), score(vh.T)


def spectral_order(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_order, col_order): coordinates sorted by ascending spectral_index_scores (stable ties)."""
    rows, cols = spectral_index_scores(weight)
    return torch.argsort(rows, stable=True), torch.argsort(cols, stable=True)


def split_sizes(n: int, parts: int) -> list[int]:
    """Chunk sizes of torch.tensor_split(range(n), parts): ceil(n/parts) for the first n % parts."""
    if not 0 < parts <= n:
        raise ValueError(f"cannot split {n} coordinates into {parts} non-empty blocks")
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def offsets(sizes: list[int]) -> torch.Tensor:
    """Block boundaries [0, s0, s0+s1, ..., n] as int64."""
    out = torch.zeros(len(sizes) + 1, dtype=torch.long)
    out[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.long), 0)
    return out
