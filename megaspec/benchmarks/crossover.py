"""Fast path or dense: where building dW and multiplying beats the FFT path of sparse_spectrum_linear.

Each row times one forward+backward (input and coefficient gradients) of
`sparse_spectrum_linear(path="fast")` and `(path="dense")` on the same layer, interleaved, and
says which `path="auto"` takes (megaspec.spectral.sparse.fast_path_pays: the FFT path when
M N > DENSE_CROSSOVER (n + M + N)). This is the measurement behind DENSE_CROSSOVER.
"""

from __future__ import annotations

import statistics
import time

import torch

from megaspec.benchmarks.common import table
from megaspec.spectral.sparse import fast_path_pays, sparse_spectrum_linear


def _step(x: torch.Tensor, coeffs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, m: int, path: str) -> float:
    x.grad = coeffs.grad = None
    start = time.perf_counter()
    y = sparse_spectrum_linear(x, coeffs, rows, cols, m, path=path)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - start


def run(shapes: list[tuple[int, int]], ns: tuple[int, ...], tokens: tuple[int, ...], reps: int = 7, threads: int = 1) -> list[dict]:
    """Median fwd+bwd ms of both paths for every (tokens, shape, n) with n < M N; table rows."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = []
    try:
        for b in tokens:
            for m, n_in in shapes:
                for n in ns:
                    if n >= m * n_in:
                        continue
                    g = torch.Generator().manual_seed(0)
                    flat = torch.randperm(m * n_in, generator=g)[:n]
                    rows, cols = flat // n_in, flat % n_in
                    x = torch.randn(b, n_in, generator=g).requires_grad_(True)
                    coeffs = torch.randn(n, generator=g).requires_grad_(True)
                    times: dict[str, list[float]] = {"fast": [], "dense": []}
                    for i in range(reps + 1):  # one warm-up round
                        for path in times:
                            t = _step(x, coeffs, rows, cols, m, path)
                            if i:
                                times[path].append(t)
                    fast, dense = (1e3 * statistics.median(times[p]) for p in ("fast", "dense"))
                    auto = "fast" if fast_path_pays((m, n_in), n) else "dense"
                    faster = "fast" if fast <= dense else "dense"
                    out.append({"tokens": b, "shape": f"{m}x{n_in}", "n": n, "ratio": m * n_in / (n + m + n_in),
                                "fast_ms": fast, "dense_ms": dense, "faster": faster, "auto": auto,
                                "auto_cost": (fast if auto == "fast" else dense) / min(fast, dense)})
    finally:
        torch.set_num_threads(threads_before)
    return out


COLUMNS = [
    ("tokens", "B", "d"), ("shape", "shape", ""), ("n", "n", "d"), ("ratio", "MN/(n+M+N)", ".0f"),
    ("fast_ms", "fast ms", ".2f"), ("dense_ms", "dense ms", ".2f"), ("faster", "faster", ""), ("auto", "auto picks", ""),
    ("auto_cost", "auto / best", ".2f"),
]


def format_table(rows: list[dict]) -> str:
    """A fixed-width table for stdout."""
    return table(rows, COLUMNS)
