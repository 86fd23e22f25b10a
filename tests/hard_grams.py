"""A shared bank of hard Gram matrices for min-norm (MGDA) solvers and aggregators.

``hard_grams(k)`` returns ``{case name: float64 [n, k, k]}``; every Gram matrix is built
from explicit gradients, ``G = g g^T`` (plus a rounding case computed in float32, which
can have tiny negative eigenvalues and asymmetry). ``WELL_POSED`` names the cases whose
optimal weights are unique and well conditioned, where weights (not only values) can be
compared between solvers.

``nnls_min_norm(G)`` is an independent exact solver (scipy's NNLS): writing u = t w with
t = sum(u) >= 0, ``min_{u >= 0} |[R; 1^T] u - [0; 1]|^2 = min_w t^2 q + (t - 1)^2`` with
q = w^T G w, whose minimum over t is q / (1 + q), increasing in q; so ``w = u / sum(u)``
is the min-norm weighting. R comes from the eigendecomposition of G (negative
eigenvalues from rounding clipped), after scaling G to max diagonal 1.
"""

from __future__ import annotations

import numpy as np
import torch

CASES = (
    "zero",
    "rank_deficient",
    "nearly_collinear",
    "conflicting",
    "scales_1e-1_1e1",
    "scales_1e-4_1e4",
    "identical",
    "one_zero",
    "random_psd",
    "rounded_fp32",
)
WELL_POSED = ("conflicting", "scales_1e-1_1e1", "random_psd")


def _directions(n: int, k: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(n, k, dim, generator=gen, dtype=torch.float64)
    return g / g.norm(dim=-1, keepdim=True)


def _log_uniform(n: int, k: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, k, 1, generator=gen, dtype=torch.float64)
    return 10 ** (np.log10(lo) + u * (np.log10(hi) - np.log10(lo)))


def gradients(case: str, k: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Gradients ``[n, k, dim]`` (float64) for one case of the bank."""
    gen = torch.Generator().manual_seed(seed * 1009 + k * 31 + CASES.index(case))
    dim = k + 3
    if case == "zero":
        return torch.zeros(n, k, dim, dtype=torch.float64)
    if case == "rank_deficient":
        low = torch.randn(n, k, max(1, k // 2), generator=gen, dtype=torch.float64)
        return low @ torch.randn(max(1, k // 2), dim, generator=gen, dtype=torch.float64)
    if case == "nearly_collinear":
        base = torch.randn(n, 1, dim, generator=gen, dtype=torch.float64)
        return base + 1e-4 * torch.randn(n, k, dim, generator=gen, dtype=torch.float64)
    if case == "conflicting":
        # Pairs pointing against each other (cosines near -0.9) plus random others.
        g = _directions(n, k, dim, gen)
        if k >= 2:
            g[:, 1] = -0.9 * g[:, 0] + 0.43 * _directions(n, 1, dim, gen)[:, 0]
        if k >= 4:
            g[:, 3] = -0.8 * g[:, 2] + 0.6 * _directions(n, 1, dim, gen)[:, 0]
        return g
    if case == "scales_1e-1_1e1":
        return _directions(n, k, dim, gen) * _log_uniform(n, k, 1e-1, 1e1, gen)
    if case == "scales_1e-4_1e4":
        return _directions(n, k, dim, gen) * _log_uniform(n, k, 1e-4, 1e4, gen)
    if case == "identical":
        return torch.randn(n, 1, dim, generator=gen, dtype=torch.float64).expand(n, k, dim)
    if case == "one_zero":
        g = torch.randn(n, k, dim, generator=gen, dtype=torch.float64)
        g[:, k // 2] = 0
        return g
    if case in ("random_psd", "rounded_fp32"):
        return torch.randn(n, k, 2 * k + 1, generator=gen, dtype=torch.float64)
    raise ValueError(f"unknown case {case!r}")


def gram_of(case: str, g: torch.Tensor) -> torch.Tensor:
    if case == "rounded_fp32":
        # Nearly collinear gradients, Gram accumulated in float32: asymmetric rounding.
        g32 = (g[:, :1] + 1e-3 * g).float()
        return (g32 @ g32.transpose(-1, -2).contiguous()).double() * (
            1
            + 1e-7
            * torch.randn(
                g.shape[0],
                g.shape[1],
                g.shape[1],
                generator=torch.Generator().manual_seed(7),
                dtype=torch.float64,
            )
        )
    return g @ g.transpose(-1, -2)


def hard_grams(k: int, n: int = 4, seed: int = 0, cases=CASES) -> dict[str, torch.Tensor]:
    """``{case: float64 [n, k, k]}`` for every case of the bank."""
    return {case: gram_of(case, gradients(case, k, n, seed)) for case in cases}


def nnls_min_norm(gram) -> np.ndarray:
    """Exact min-norm weights ``[K]`` of one Gram matrix via scipy's NNLS (see module doc)."""
    from scipy.optimize import nnls

    g = np.asarray(gram, dtype=np.float64)
    g = (g + g.T) / 2
    k = g.shape[0]
    m = np.max(np.diag(g))
    if not m > 0:
        return np.full(k, 1.0 / k)
    lam, vec = np.linalg.eigh(g / m)
    r = np.sqrt(np.clip(lam, 0, None))[:, None] * vec.T
    a = np.vstack([r, np.ones((1, k))])
    b = np.zeros(k + 1)
    b[-1] = 1
    u, _ = nnls(a, b, maxiter=50 * k)
    return u / u.sum()
