"""Low-rank factorisations of an adapter's update dW = B A for LoRA export, from exact factors or row blocks.

An exact factorisation (Adapter.low_rank_factors: the method's structure, e.g. the sparse-spectrum
kernels' explicit bases, megaspec.spectral.sparse.spectrum_factors) is reduced to its numerical rank
by one QR + SVD of a k x k core (never an M x N matrix), which also gives the best rank-r
truncation. Methods without a known structure go through `svd_by_rows`: an exact SVD from row
blocks of dW.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

RowsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LowRank:
    """dW = left diag(s) right^T with orthonormal columns in left (M x k) and right (N x k), s descending."""

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def factors(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of the best rank-`rank` approximation (all of it by default), zero-padded up to `rank`."""
        k = self.rank if rank is None else min(rank, self.rank)
        root = self.s[:k].sqrt()
        b, a = self.left[:, :k] * root, (self.right[:, :k] * root).T
        pad = 0 if rank is None else rank - k
        if pad:
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        return b, a

    def tail(self, rank: int) -> float:
        """||dW - B_r A_r||_F / ||dW||_F predicted by the singular values (0 for a zero update)."""
        total = float(self.s.square().sum())
        return math.sqrt(float(self.s[rank:].square().sum()) / total) if total > 0 else 0.0


def rank_tolerance(s_max: float) -> float:
    """Singular values below s_max * eps(fp32) are dropped: they change no entry of fp32 factors' product."""
    return s_max * torch.finfo(torch.float32).eps


def compress(b: torch.Tensor, a: torch.Tensor) -> LowRank:
    """The SVD of B A (M x k times k x N) at its numerical rank, from a QR of each factor (float64)."""
    b, a = b.double(), a.double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = int((s > rank_tolerance(float(s[0]) if s.numel() else 0.0)).sum())
    return LowRank(qb @ u[:, :keep], s[:keep], qa @ vh[:keep].T)


def row_blocks(m: int, block: int) -> list[torch.Tensor]:
    """Row ids 0..m-1 in blocks of at most `block`."""
    return [torch.arange(start, min(start + block, m)) for start in range(0, m, block)]


def svd_by_rows(rows_fn: RowsFn, shape: tuple[int, int], block: int = 1024) -> LowRank:
    """Exact SVD (to numerical rank) of an M x N matrix known only by row blocks `rows_fn(row_ids)`.

    N <= M: the N x N Gram matrix is summed over row blocks (never the whole matrix), then
    left = D V / s block by block. M < N: the M x N matrix is smaller than an N x N Gram matrix,
    so it is assembled once. Float64 throughout.
    """
    m, n = shape
    blocks = row_blocks(m, block)
    if n <= m:
        gram = torch.zeros(n, n, dtype=torch.float64)
        for ids in blocks:
            d = rows_fn(ids).double().cpu()
            gram += d.T @ d
        evals, vecs = torch.linalg.eigh(gram)
        s, right = evals.flip(0).clamp_min(0).sqrt(), vecs.flip(1)
        keep = int((s > rank_tolerance(float(s[0]))).sum())
        s, right = s[:keep], right[:, :keep]
        left = torch.cat([rows_fn(ids).double().cpu() @ right for ids in blocks], dim=0) / s
        return LowRank(left, s, right)
    d = torch.cat([rows_fn(ids).double().cpu() for ids in blocks], dim=0)
    evals, vecs = torch.linalg.eigh(d @ d.T)
    s, left = evals.flip(0).clamp_min(0).sqrt(), vecs.flip(1)
    keep = int((s > rank_tolerance(float(s[0]))).sum())
    s, left = s[:keep], left[:, :keep]
    return LowRank(left, s, (d.T @ left) / s)


def residual(rows_fn: RowsFn, b: torch.Tensor, a: torch.Tensor, block: int = 1024) -> float:
    """||dW - B A||_F / ||dW||_F measured against the update's own rows (0 when dW is zero)."""
    err = total = 0.0
    a = a.double()
    for ids in row_blocks(b.shape[0], block):
        d = rows_fn(ids).double().cpu()
        err += float((d - b[ids].double() @ a).square().sum())
        total += float(d.square().sum())
    return math.sqrt(err / total) if total > 0 else math.sqrt(err)
