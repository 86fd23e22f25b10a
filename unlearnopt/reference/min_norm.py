"""Reference min-norm (MGDA) solver: plain, batched PyTorch in float64.

Problem, for every Gram matrix ``G = [<g_i, g_j>]`` of K vectors in the batch::

    minimise  w^T G w   subject to  w >= 0,  sum(w) = 1

i.e. the point of minimum norm in the convex hull of the g_i, known only through G.

How it is solved (all backends follow the same recipe, see ``unlearnopt/ops/min_norm.py``):

* ``G`` is symmetrised, ``(G + G^T) / 2``, and divided by its largest diagonal entry
  ``m`` (the answer ``w`` is scale invariant; every tolerance below is relative to m).
  ``m == 0`` means every g_i is zero: the weights are uniform.
* ``K == 1``: ``w = [1]``. ``K == 2``: closed form
  ``w_1 = clamp((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)``; a denominator below
  ``PIVOT_TOL`` (the vectors coincide, or rounding made G indefinite) gives the vertex
  with the smaller diagonal, or ``[1/2, 1/2]`` when the diagonals are equal.
* ``3 <= K <= ENUM_MAX_K``: exact, by enumerating the faces of the simplex. On a face S
  the affine minimiser solves ``G_S w_S = lam 1, 1^T w_S = 1``. Adding ``c 11^T`` to G
  changes ``w^T G w`` by the constant c on the simplex, and makes ``G'_S = G_S + c 11^T``
  positive definite exactly when the g_i, i in S, are affinely independent (then
  ``d^T G'_S d = |sum d_i g_i|^2 + c (1^T d)^2 > 0``); so with c = 1 (after scaling)
  ``w_S = G'^-1_S 1 / (1^T G'^-1_S 1)`` by a Cholesky solve, and a face is skipped when a
  pivot falls below ``PIVOT_TOL`` (affinely dependent: a smaller face holds the same
  point). Candidates with all ``w_S >= -FEAS_TOL`` are clamped onto the simplex, and the
  one with the smallest KKT residual wins: the optimal face has residual ~rounding,
  every other face a positive one. (Picking by smallest value instead can, in low
  precision, prefer a neighbouring face whose value differs only below rounding but
  whose KKT residual is large.)
* ``K > ENUM_MAX_K``: FISTA (accelerated projected gradient, sort-based simplex
  projection, step ``1/L`` with ``L = 2 min(trace, max absolute row sum) >= 2 lambda_max``)
  for a fixed number of iterations, then a few "polish" rounds that solve the equality
  problem on the current support (plus the most violated index) and keep the result when
  it is feasible and has a smaller KKT residual. Not exact in general: report
  :func:`kkt_residual`.

No host synchronisation: every branch on values is a ``torch.where``.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

ENUM_MAX_K = 8          # exact face enumeration up to here (2^8 - 1 = 255 faces)
FISTA_ITERS = 500       # fixed iteration budget of the K > ENUM_MAX_K path
POLISH_ROUNDS = 4       # equality solves on the support after FISTA
PIVOT_TOL = 1e-13       # smallest accepted Cholesky pivot of G'_S (G scaled to max diag 1)
FEAS_TOL = 1e-10        # a face's weights may dip this far below 0 and still count
CHUNK_FACE_ENTRIES = 1 << 22  # problems x faces x K per enumeration batch (bounds memory)


class MinNorm(NamedTuple):
    """Result of :func:`min_norm`: simplex ``weights`` ``[B, K]`` and ``value`` ``[B]`` = w^T G w."""

    weights: torch.Tensor
    value: torch.Tensor


def symmetrize(gram: torch.Tensor) -> torch.Tensor:
    return (gram + gram.transpose(-1, -2)) / 2


def max_diag(gram: torch.Tensor) -> torch.Tensor:
    """``[B]``: the largest diagonal entry, clamped at 0."""
    return gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp(min=0)


def kkt_residual(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale-free KKT violation of ``weights`` ``[B, K]`` for ``gram`` ``[B, K, K]`` -> ``[B]``.

    With ``v = w^T G w`` the optimality conditions are ``(Gw)_i >= v`` for every i, with
    equality where ``w_i > 0``. The residual is
    ``max_i max((v - (Gw)_i)^+, [w_i > 0] |(Gw)_i - v|) / max_i G_ii`` (0 when G = 0), in
    float64. It does not check that ``w`` is on the simplex.
    """
    g = symmetrize(gram.double())
    w = weights.double()
    gw = (g @ w.unsqueeze(-1)).squeeze(-1)
    v = (w * gw).sum(-1, keepdim=True)
    dual = (v - gw).clamp(min=0)
    comp = torch.where(w > 0, (gw - v).abs(), torch.zeros_like(gw))
    scale = max_diag(g).clamp(min=torch.finfo(torch.float64).tiny)
    return torch.maximum(dual, comp).amax(-1) / scale


def project_simplex(x: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``x`` ``[B, K]`` onto the probability simplex.

    Sort-based: with u sorted descending and ``rho`` the last j with
    ``u_j > (sum_{i<=j} u_i - 1) / j``, the projection is ``max(x - tau, 0)`` where
    ``tau = (sum_{i<=rho} u_i - 1) / rho``.
    """
    k = x.shape[-1]
    u = x.sort(dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    j = torch.arange(1, k + 1, device=x.device, dtype=x.dtype)
    positive = u - css / j > 0  # true on a prefix
    rho = (positive * j).amax(-1, keepdim=True).clamp(min=1)
    tau = css.gather(-1, rho.long() - 1) / rho
    return (x - tau).clamp(min=0)


def _renormalize(w: torch.Tensor) -> torch.Tensor:
    w = w.clamp(min=0)
    return w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)


def _solve_k2(gn: torch.Tensor) -> torch.Tensor:
    g11, g22, g12 = gn[:, 0, 0], gn[:, 1, 1], gn[:, 0, 1]
    denom = g11 + g22 - 2 * g12  # |g1 - g2|^2
    ok = denom > PIVOT_TOL
    w1 = ((g22 - g12) / torch.where(ok, denom, torch.ones_like(denom))).clamp(0, 1)
    # Degenerate (g1 = g2) or, from rounding, negative curvature along the segment: the
    # objective is linear/concave there, so the vertex with the smaller norm wins.
    vertex = torch.where(g11 < g22, 1.0, torch.where(g22 < g11, 0.0, 0.5)).to(w1.dtype)
    w1 = torch.where(ok, w1, vertex)
    return torch.stack([w1, 1 - w1], dim=-1)


def _faces(k: int, device: torch.device):
    """Every non-empty subset of range(k), grouped by size: ``[C, s]`` index tensors."""
    for size in range(1, k + 1):
        yield torch.tensor(list(itertools.combinations(range(k), size)), device=device)


def _solve_enumerate(gn: torch.Tensor) -> torch.Tensor:
    """Exact min-norm weights ``[B, K]`` for scaled Gram matrices ``gn`` ``[B, K, K]`` (K <= 8)."""
    b, k, _ = gn.shape
    shifted = gn + 1.0  # G' = G + 11^T: positive definite on affinely independent faces
    best_w = torch.zeros(b, k, dtype=gn.dtype, device=gn.device)
    best_r = torch.full((b,), math.inf, dtype=gn.dtype, device=gn.device)
    for idx in _faces(k, gn.device):
        c, s = idx.shape
        sub = shifted[:, idx[:, :, None], idx[:, None, :]]  # [B, C, s, s]
        chol, info = torch.linalg.cholesky_ex(sub)
        pivots = chol.diagonal(dim1=-2, dim2=-1).square()
        ok = (info == 0) & (pivots.amin(-1) > PIVOT_TOL)
        ones = torch.ones(b, c, s, 1, dtype=gn.dtype, device=gn.device)
        u = torch.cholesky_solve(ones, chol).squeeze(-1)
        w_face = u / u.sum(-1, keepdim=True)
        ok = ok & torch.isfinite(w_face).all(-1) & (w_face >= -FEAS_TOL).all(-1)
        w_face = _renormalize(torch.where(ok.unsqueeze(-1), w_face, torch.ones_like(w_face)))
        w = torch.zeros(b, c, k, dtype=gn.dtype, device=gn.device)
        w.scatter_(-1, idx.expand(b, c, s), w_face)
        r = kkt_residual(gn.unsqueeze(1), w)  # [B, C]
        r = torch.where(ok, r, torch.full_like(r, math.inf))
        r_min, arg = r.min(-1)
        better = r_min < best_r
        pick = w.gather(1, arg[:, None, None].expand(b, 1, k)).squeeze(1)
        best_w = torch.where(better.unsqueeze(-1), pick, best_w)
        best_r = torch.where(better, r_min, best_r)
    return best_w


def _solve_on_support(gn: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine minimiser on each row's ``support`` ``[B, K]`` bool; returns (w, feasible)."""
    k = gn.shape[-1]
    eye = torch.eye(k, dtype=gn.dtype, device=gn.device)
    both = support.unsqueeze(-1) & support.unsqueeze(-2)
    a = torch.where(both, gn + 1.0, eye)  # identity off the support keeps it SPD
    chol, info = torch.linalg.cholesky_ex(a)
    pivots = chol.diagonal(dim1=-2, dim2=-1).square()
    u = torch.cholesky_solve(support.to(gn.dtype).unsqueeze(-1), chol).squeeze(-1)
    w = u / u.sum(-1, keepdim=True)
    ok = (info == 0) & (pivots.amin(-1) > PIVOT_TOL)
    ok = ok & torch.isfinite(w).all(-1) & (w >= -FEAS_TOL).all(-1)
    w = _renormalize(torch.where(ok.unsqueeze(-1), w, torch.ones_like(w)))
    return w, ok


def _solve_fista(gn: torch.Tensor, iters: int) -> torch.Tensor:
    """FISTA on ``w^T G w`` over the simplex, then equality-solve polishing (K > ENUM_MAX_K)."""
    b, k, _ = gn.shape
    trace = gn.diagonal(dim1=-2, dim2=-1).sum(-1)
    rows = gn.abs().sum(-1).amax(-1)
    lip = (2 * torch.minimum(trace, rows)).clamp(min=torch.finfo(gn.dtype).tiny)
    step = (1 / lip)[:, None]
    w = torch.full((b, k), 1.0 / k, dtype=gn.dtype, device=gn.device)
    y = w
    t = 1.0
    for _ in range(iters):
        grad = 2 * (gn @ y.unsqueeze(-1)).squeeze(-1)
        w_next = project_simplex(y - step * grad)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, t_next
    best_r = kkt_residual(gn, w)
    support = w > 0
    for _ in range(POLISH_ROUNDS):
        gw = (gn @ w.unsqueeze(-1)).squeeze(-1)
        support = support | (gw == gw.min(-1, keepdim=True).values)  # add most violated
        cand, ok = _solve_on_support(gn, support)
        r = torch.where(ok, kkt_residual(gn, cand), torch.full_like(best_r, math.inf))
        better = r < best_r
        w = torch.where(better.unsqueeze(-1), cand, w)
        best_r = torch.where(better, r, best_r)
        support = torch.where(ok.unsqueeze(-1), cand > 0, support)
    return w


def solve_scaled(gn: torch.Tensor, iters: int = FISTA_ITERS) -> torch.Tensor:
    """Weights ``[B, K]`` for symmetrised Gram matrices scaled to max diagonal 1 (or all 0)."""
    b, k, _ = gn.shape
    if k == 1:
        return torch.ones(b, 1, dtype=gn.dtype, device=gn.device)
    if k == 2:
        return _solve_k2(gn)
    if k <= ENUM_MAX_K:
        chunk = max(1, CHUNK_FACE_ENTRIES // ((1 << k) * k))
        return torch.cat([_solve_enumerate(part) for part in gn.split(chunk)]) if b else \
            gn.new_zeros(0, k)
    return _solve_fista(gn, iters)


def min_norm(gram: torch.Tensor, iters: int = FISTA_ITERS) -> MinNorm:
    """Min-norm simplex weights of ``gram`` ``[B, K, K]``; float64 math.

    Returns ``MinNorm(weights [B, K], value [B])`` in ``gram``'s dtype promoted to at
    least float32, without autograd history.
    """
    out_dtype = torch.promote_types(gram.dtype, torch.float32)
    with torch.no_grad():
        g = symmetrize(gram.double())
        m = max_diag(g)
        zero = ~(m > 0)
        gn = g / torch.where(zero, torch.ones_like(m), m)[:, None, None]
        w = solve_scaled(gn, iters)
        k = g.shape[-1]
        w = torch.where(zero.unsqueeze(-1), torch.full_like(w, 1.0 / k), w)
        value = (w * (g @ w.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return MinNorm(w.to(out_dtype), value.to(out_dtype))
