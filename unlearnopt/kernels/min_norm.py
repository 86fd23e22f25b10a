"""Triton kernel of the batched min-norm (MGDA) solver.

One program solves ``BLOCK`` problems; each lane holds one problem's Gram matrix as a
``[KP, KP]`` register tile (KP = K rounded up to a power of two). The recipe is the
reference's (``unlearnopt/reference/min_norm.py``), in float64 registers: the QP is
tiny, the data is read once, and float64 lets the exact face enumeration reach KKT
residuals at 1e-16 instead of fp32's ~1e-7 x condition number (on H100 float64 FMAs run
at the float32 vector rate).

* K = 1, 2: closed form.
* 3 <= K <= 8: a runtime loop over the 2^K - 1 faces; on each, the system
  ``G'_S u = 1_S`` (G' = G + 11^T, identity off the face) is solved by unrolled
  Gauss-Jordan elimination without pivoting (G'_S is positive definite on affinely
  independent faces; a pivot below PIVOT_TOL rejects the face), ``w = u / sum(u)``,
  and the feasible face with the smallest KKT residual is kept, all with lane masks.
* K > 8: the reference active set (Lawson-Hanson) as batched torch ops on the same
  device, a fixed number of masked steps (no host synchronisation).

No host synchronisation; the launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearnopt.reference import min_norm as ref

# Launch settings, in one place: problems per program and warps, by padded K.
_BLOCK = {1: 128, 2: 128, 4: 32, 8: 16}
_WARPS = {1: 4, 2: 4, 4: 4, 8: 4}


@triton.jit
def _kkt(gn, w, valid_k):
    """KKT residual ``[BLOCK]`` of weights ``w`` ``[BLOCK, KP]`` for scaled ``gn``."""
    gw = tl.sum(gn * w[:, None, :], axis=2)
    v = tl.sum(w * gw, axis=1)
    d = gw - v[:, None]
    viol = tl.where(w > 0, tl.abs(d), tl.maximum(-d, 0.0))
    viol = tl.where(valid_k[None, :], viol, 0.0)
    return tl.max(viol, axis=1)


@triton.jit
def _min_norm_kernel(
    g_ptr,
    w_ptr,
    v_ptr,
    B,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
    PIVOT_TOL: tl.constexpr,
    FEAS_TOL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    row_ok = rows < B
    ki = tl.arange(0, KP)
    valid_k = ki < K
    i3 = ki[None, :, None]
    j3 = ki[None, None, :]
    r3 = rows[:, None, None]
    m3 = row_ok[:, None, None] & (i3 < K) & (j3 < K)
    g = tl.load(g_ptr + r3 * (K * K) + i3 * K + j3, mask=m3, other=0.0)
    gt = tl.load(g_ptr + r3 * (K * K) + j3 * K + i3, mask=m3, other=0.0)
    g = (g + gt) * 0.5
    eye = i3 == j3
    diag = tl.sum(tl.where(eye, g, 0.0), axis=2)  # [BLOCK, KP]
    m = tl.max(tl.where(valid_k[None, :], diag, 0.0), axis=1)
    zero = ~(m > 0)
    gn = g / tl.where(zero, 1.0, m)[:, None, None]

    if K == 1:
        w = tl.where(valid_k[None, :], 1.0, 0.0) + tl.zeros([BLOCK, KP], tl.float64)
    elif K == 2:
        g11 = tl.sum(tl.sum(tl.where((i3 == 0) & (j3 == 0), gn, 0.0), axis=2), axis=1)
        g22 = tl.sum(tl.sum(tl.where((i3 == 1) & (j3 == 1), gn, 0.0), axis=2), axis=1)
        g12 = tl.sum(tl.sum(tl.where((i3 == 0) & (j3 == 1), gn, 0.0), axis=2), axis=1)
        denom = g11 + g22 - 2.0 * g12
        ok = denom > PIVOT_TOL
        w1 = (g22 - g12) / tl.where(ok, denom, 1.0)
        vertex = tl.where(g11 < g22, 1.0, tl.where(g22 < g11, 0.0, 0.5))
        w1 = tl.where(ok, tl.minimum(tl.maximum(w1, 0.0), 1.0), vertex)
        w = tl.where(ki[None, :] == 0, w1[:, None], 1.0 - w1[:, None])
    else:
        shifted = gn + 1.0
        best_w = tl.zeros([BLOCK, KP], tl.float64)
        best_r = tl.full([BLOCK], float("inf"), tl.float64)
        for face in range(1, 1 << K):
            member = ((face >> ki) & 1) != 0  # [KP]
            both = member[:, None] & member[None, :]
            a = tl.where(both[None, :, :], shifted, tl.where(eye, 1.0, 0.0))
            rhs = tl.where(member[None, :], 1.0, 0.0) + tl.zeros([BLOCK, KP], tl.float64)
            ok = row_ok
            for p in tl.static_range(KP):
                row_p = tl.sum(tl.where(i3 == p, a, 0.0), axis=1)  # [BLOCK, KP]
                col_p = tl.sum(tl.where(j3 == p, a, 0.0), axis=2)  # [BLOCK, KP]
                piv = tl.sum(tl.where(ki[None, :] == p, row_p, 0.0), axis=1)
                rhs_p = tl.sum(tl.where(ki[None, :] == p, rhs, 0.0), axis=1)
                good = piv > PIVOT_TOL
                ok = ok & good
                f = tl.where(ki[None, :] == p, 0.0, col_p / tl.where(good, piv, 1.0)[:, None])
                a = a - f[:, :, None] * row_p[:, None, :]
                rhs = rhs - f * rhs_p[:, None]
            d = tl.sum(tl.where(eye, a, 0.0), axis=2)
            u = tl.where(member[None, :], rhs / tl.where(d > PIVOT_TOL, d, 1.0), 0.0)
            cand = u / tl.sum(u, axis=1)[:, None]
            low = tl.min(tl.where(member[None, :], cand, 1.0), axis=1)
            ok = ok & (low >= -FEAS_TOL)
            cand = tl.maximum(cand, 0.0)
            cand = cand / tl.maximum(tl.sum(cand, axis=1), 1e-300)[:, None]
            r = _kkt(gn, cand, valid_k)
            better = ok & (r < best_r)
            best_w = tl.where(better[:, None], cand, best_w)
            best_r = tl.where(better, r, best_r)
        w = best_w
    w = tl.where(zero[:, None], 1.0 / K, w)
    w = tl.where(valid_k[None, :], w, 0.0)
    value = tl.sum(w * tl.sum(g * w[:, None, :], axis=2), axis=1)
    tl.store(w_ptr + rows[:, None] * K + ki[None, :], w, mask=row_ok[:, None] & valid_k[None, :])
    tl.store(v_ptr + rows, value, mask=row_ok)


def min_norm_batched(gram: torch.Tensor, max_steps: int | None = None):
    """Weights ``[B, K]`` and values ``[B]`` (float64) for contiguous float64 ``gram``;
    ``max_steps`` caps the active-set steps for K > 8."""
    assert gram.dtype == torch.float64 and gram.is_contiguous() and gram.dim() == 3
    b, k, _ = gram.shape
    if k > ref.ENUM_MAX_K:
        return ref.min_norm(gram, max_steps)
    w = torch.empty(b, k, dtype=torch.float64, device=gram.device)
    v = torch.empty(b, dtype=torch.float64, device=gram.device)
    if b == 0:
        return w, v
    kp = triton.next_power_of_2(k)
    block = _BLOCK[kp]
    _min_norm_kernel[(triton.cdiv(b, block),)](
        gram,
        w,
        v,
        b,
        K=k,
        KP=kp,
        BLOCK=block,
        PIVOT_TOL=ref.PIVOT_TOL,
        FEAS_TOL=ref.FEAS_TOL,
        num_warps=_WARPS[kp],
    )
    return w, v
