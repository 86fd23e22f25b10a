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
* ``K > ENUM_MAX_K``: exact, by an active-set method: Lawson-Hanson non-negative least
  squares on the Gram. Writing ``u = t w`` with ``t = sum(u) >= 0``,
  ``min_{u >= 0} u^T (G + 11^T) u - 2 1^T u = min_{t, w} t^2 q + (t - 1)^2 - 1`` with
  ``q = w^T G w``; the minimum over t is ``-1 / (1 + q)``, increasing in q, so the NNLS
  solution u gives ``w* = u / sum(u)``. The method grows a support P one index at a time
  (the one whose dual ``1 - (Hu)_j`` is largest), solves the equality problem on P by
  Cholesky, and steps back (dropping an index) when that solution leaves the orthant; it
  ends when no dual exceeds ``DUAL_TOL``, i.e. at a KKT point, exact to rounding. Steps
  are capped at ``max_steps`` (default :func:`default_max_steps`), far above what
  Lawson-Hanson needs in practice (about K adds plus a few drops).

No host synchronisation on accelerators: every branch on values is a ``torch.where``
(the active-set loop stops early only for CPU tensors, where reading a flag is free).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

ENUM_MAX_K = 8  # exact face enumeration up to here (2^8 - 1 = 255 faces)
PIVOT_TOL = 1e-13  # smallest accepted Cholesky pivot of G'_S (G scaled to max diag 1)
FEAS_TOL = 1e-10  # a face's weights may dip this far below 0 and still count
DUAL_TOL = 1e-13  # active set: an index off the support enters when its dual exceeds this
CHUNK_FACE_ENTRIES = 1 << 22  # problems x faces x K per enumeration batch (bounds memory)


class MinNorm(NamedTuple):
    """Result of :func:`min_norm`: simplex ``weights`` ``[B, K]``, ``value`` ``[B]`` = w^T G w."""

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


def _solve_on_support(h: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s`` ``[B, K]`` solving ``H_PP s_P = 1_P`` (0 off the support P), and whether the
    Cholesky pivots of ``H_PP`` all exceed ``PIVOT_TOL`` (P affinely independent)."""
    k = h.shape[-1]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    both = support.unsqueeze(-1) & support.unsqueeze(-2)
    a = torch.where(both, h, eye)  # identity off the support keeps it SPD
    chol, info = torch.linalg.cholesky_ex(a)
    pivots = chol.diagonal(dim1=-2, dim2=-1).square()
    ok = (info == 0) & (pivots.amin(-1) > PIVOT_TOL)
    chol = torch.where(ok[:, None, None], chol, eye)  # keep failed rows finite
    s = torch.cholesky_solve(support.to(h.dtype).unsqueeze(-1), chol).squeeze(-1)
    return torch.where(support, s, torch.zeros_like(s)), ok


def default_max_steps(k: int) -> int:
    """Cap on the active-set steps for K objectives (each step adds or drops one index)."""
    return 4 * k + 16


def _solve_active_set(gn: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Exact min-norm weights ``[B, K]`` by Lawson-Hanson NNLS on the scaled Gram ``gn``.

    With ``H = G + 11^T``, ``min_{u >= 0} u^T H u - 2 1^T u`` is the NNLS problem
    ``min_{u >= 0} |[R; 1^T] u - [0; 1]|^2`` (``R^T R = G``); its solution is ``u = t w*``
    with ``t = 1 / (1 + w*^T G w*)``, so ``w* = u / sum(u)`` (see the module docstring).
    The dual ``r = 1 - H u`` is ``t ((Gw)_i - v)`` off the support: the KKT residual of w
    up to the factor ``t`` in [1/2, 1].

    Every problem runs the same state machine, masked, ``max_steps`` times (CPU tensors
    stop as soon as every problem is done; on accelerators the loop is fixed so nothing
    synchronises with the host):

    * solve ``H_PP s_P = 1_P`` on the support P;
    * ``s_P > 0``: accept ``u = s``; if no index off P has ``r_j > DUAL_TOL`` it is
      optimal, else add the ``j`` with the largest ``r_j``;
    * some ``s_i <= 0``: move from u towards s until the first coordinate reaches 0
      (``alpha = min u_i / (u_i - s_i)``) and drop it;
    * an index that was just added on a rounding-level ``r_j`` can make ``H_PP`` singular
      (g_j affinely dependent on P: then r_j = 0 exactly) or come back with ``s_j <= 0``
      (impossible in exact arithmetic): the add is undone and u, optimal on P, is final.

    It starts from the vertex with the smallest norm. Each solve is a Cholesky of the
    masked ``H`` (identity off P).
    """
    b, k, _ = gn.shape
    h = gn + 1.0
    cols = torch.arange(k, device=gn.device)
    first = gn.diagonal(dim1=-2, dim2=-1).argmin(-1)
    support = cols == first[:, None]
    u = torch.zeros(b, k, dtype=gn.dtype, device=gn.device)
    last = first.clone()
    just_added = torch.zeros(b, dtype=torch.bool, device=gn.device)
    done = torch.zeros(b, dtype=torch.bool, device=gn.device)
    check_done = gn.device.type == "cpu"  # reading a CPU flag costs no device sync
    for _ in range(max_steps):
        if check_done and bool(done.all()):
            break
        s, ok = _solve_on_support(h, support)
        s_last = s.gather(-1, last[:, None]).squeeze(-1)
        noise = ~ok | (just_added & ~(s_last > 0))
        undo = ~done & noise
        feasible = ((s > 0) | ~support).all(-1)
        r = 1.0 - (h @ s.unsqueeze(-1)).squeeze(-1)
        r_best, j = torch.where(support, torch.full_like(r, -math.inf), r).max(-1)
        accept = ~done & ~noise & feasible
        optimal = accept & ~(r_best > DUAL_TOL)
        add = accept & ~optimal
        drop = ~done & ~noise & ~feasible
        # Drop step: alpha = min over P with s_i <= 0 of u_i / (u_i - s_i), in [0, 1).
        step = (u - s).clamp(min=torch.finfo(u.dtype).tiny)  # u_i > 0 >= s_i on P, or 0 / tiny
        ratio = torch.where(support & ~(s > 0), u / step, torch.full_like(u, math.inf))
        alpha, i_drop = ratio.min(-1)
        alpha = torch.where(drop, alpha, torch.zeros_like(alpha))
        moved = u + alpha[:, None] * (s - u)
        keep = support & (moved > 0) & (cols != i_drop[:, None])
        u = torch.where(
            accept[:, None], s, torch.where(drop[:, None], torch.where(keep, moved, 0.0), u)
        )
        support = torch.where(
            undo[:, None] & just_added[:, None],
            support & (cols != last[:, None]),
            torch.where(drop[:, None], keep, support | (add[:, None] & (cols == j[:, None]))),
        )
        last = torch.where(add, j, last)
        just_added = add
        done = done | undo | optimal
    # u is 0 only if rounding emptied the support: the smallest vertex then.
    u = torch.where(u.sum(-1, keepdim=True) > 0, u, (cols == first[:, None]).to(u.dtype))
    return _renormalize(u)


def solve_scaled(gn: torch.Tensor, max_steps: int | None = None) -> torch.Tensor:
    """Weights ``[B, K]`` for symmetrised Gram matrices scaled to max diagonal 1 (or all 0)."""
    b, k, _ = gn.shape
    if k == 1:
        return torch.ones(b, 1, dtype=gn.dtype, device=gn.device)
    if k == 2:
        return _solve_k2(gn)
    if k <= ENUM_MAX_K:
        chunk = max(1, CHUNK_FACE_ENTRIES // ((1 << k) * k))
        return (
            torch.cat([_solve_enumerate(part) for part in gn.split(chunk)])
            if b
            else gn.new_zeros(0, k)
        )
    return _solve_active_set(gn, default_max_steps(k) if max_steps is None else max_steps)


def min_norm(gram: torch.Tensor, max_steps: int | None = None) -> MinNorm:
    """Min-norm simplex weights of ``gram`` ``[B, K, K]``; float64 math.

    ``max_steps`` caps the active-set steps for K > ``ENUM_MAX_K`` (default
    :func:`default_max_steps`). Returns ``MinNorm(weights [B, K], value [B])`` in
    ``gram``'s dtype promoted to at least float32, without autograd history.
    """
    out_dtype = torch.promote_types(gram.dtype, torch.float32)
    with torch.no_grad():
        g = symmetrize(gram.double())
        m = max_diag(g)
        zero = ~(m > 0)
        gn = g / torch.where(zero, torch.ones_like(m), m)[:, None, None]
        w = solve_scaled(gn, max_steps)
        k = g.shape[-1]
        w = torch.where(zero.unsqueeze(-1), torch.full_like(w, 1.0 / k), w)
        value = (w * (g @ w.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return MinNorm(w.to(out_dtype), value.to(out_dtype))
