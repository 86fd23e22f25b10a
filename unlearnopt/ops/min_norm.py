"""Batched min-norm (MGDA) solver: simplex weights from Gram matrices.

For each Gram matrix ``G = [<g_i, g_j>]`` of K gradients, :func:`min_norm` returns

    w* = argmin_{w >= 0, sum(w) = 1} w^T G w,

the weights of the minimum-norm point ``d = sum_i w_i g_i`` of the convex hull of the
g_i. Then ``<d, g_i> >= |d|^2`` for every i (the KKT conditions): d is a common descent
direction (MGDA). :func:`kkt_residual` measures how far weights are from satisfying them.

Exactness: K = 1 trivially, K = 2 in closed form, 3 <= K <= 8 by enumerating the faces of
the simplex, K > 8 by an active-set method (Lawson-Hanson NNLS on ``G + 11^T``); all reach
KKT residuals at float64 rounding (~1e-15). The algorithm and its tolerances are
documented in ``unlearnopt/reference/min_norm.py``; every backend follows it in float64.

Backends: ``native`` (C++, OpenMP over problems; faces depth first with incremental
Cholesky; the active set one problem at a time, stopping when optimal), ``triton`` (one
program per block of problems, each lane one problem, float64 registers; K > 8 runs the
reference active set as batched torch ops on the same device, a fixed number of steps),
``reference`` (batched torch ops). None of them synchronises with the host; only the
optional input check at this boundary does (``check=True``, one sync).
"""

from __future__ import annotations

import torch

from unlearnopt.ops._backend import choose_backend, kernel
from unlearnopt.ops._checks import check_float, check_gram_values
from unlearnopt.reference import min_norm as ref
from unlearnopt.reference.min_norm import MinNorm

__all__ = ["MinNorm", "kkt_residual", "min_norm"]


def _validate_gram(gram) -> None:
    check_float("gram", gram)
    if gram.dim() not in (2, 3) or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] < 1:
        raise ValueError(
            f"gram must be [K, K] or [B, K, K] with K >= 1, got shape {tuple(gram.shape)}"
        )


@torch.compiler.disable
def min_norm(
    gram: torch.Tensor, *, iters: int | None = None, check: bool = True, backend: str | None = None
) -> MinNorm:
    """Min-norm point of the convex hull of K vectors, given their Gram matrix, batched.

    Args:
        gram: ``[B, K, K]`` or ``[K, K]`` Gram matrices (float32 / bfloat16 / float16 /
            float64). Symmetrised as ``(G + G^T) / 2``; tiny negative eigenvalues from
            rounding are harmless. All math is float64.
        iters: cap on the active-set steps for K > 8 (each adds or drops one index;
            default ``4 K + 16``, about twice what the method needs); ignored for K <= 8.
        check: raise ``ValueError`` when ``gram`` holds NaN/Inf or is clearly not a Gram
            matrix (a diagonal entry below 0, asymmetry, or ``|G_ij| > sqrt(G_ii G_jj)``,
            each beyond rounding): one host sync, so a caller that already validates its
            Gram (the unlearner) or captures CUDA graphs passes ``check=False``; such
            input then gives unspecified (finite or not) weights. Indefinite matrices
            that pass these tests (e.g. three vectors with pairwise-consistent but
            impossible angles) are not detected.
        backend: ``"auto"`` / ``"triton"`` / ``"native"`` / ``"reference"``; default from
            ``UNLEARNOPT_BACKEND``.

    Returns:
        ``MinNorm(weights, value)``: ``weights`` ``[B, K]`` (or ``[K]``) on the probability
        simplex, ``value`` ``[B]`` (or ``[]``) = ``w^T G w``; both in ``gram``'s dtype
        promoted to at least float32, without autograd history (the weights are constants
        of the update; no gradient flows through the solver). When several weightings are
        optimal (identical or affinely dependent gradients) one of them is returned; for
        ``G = 0`` the weights are uniform.

    Plain-PyTorch equivalent for K = 2 (``g1, g2`` the gradients)::

        w1 = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1); w = [w1, 1 - w1]

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])    # two orthogonal unit gradients
        >>> min_norm(g @ g.T).weights
        tensor([0.5000, 0.5000])
    """
    _validate_gram(gram)
    if iters is not None and (not isinstance(iters, int) or isinstance(iters, bool) or iters < 0):
        raise ValueError(f"iters must be None or a non-negative int, got {iters!r}")
    if check:
        check_gram_values("gram", gram)
    single = gram.dim() == 2
    g3 = gram.unsqueeze(0) if single else gram
    out_dtype = torch.promote_types(gram.dtype, torch.float32)
    chosen = choose_backend("min_norm", backend, gram.device)
    with torch.no_grad():
        g64 = g3.detach().to(torch.float64).contiguous()
        steps = ref.default_max_steps(g64.shape[-1]) if iters is None else iters
        if chosen == "reference":
            w, value = ref.min_norm(g64, steps)
        else:
            w, value = kernel("min_norm", chosen)(g64, steps)
        w, value = w.to(out_dtype), value.to(out_dtype)
    if single:
        return MinNorm(w[0], value[0])
    return MinNorm(w, value)


@torch.compiler.disable
def kkt_residual(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale-free KKT violation of ``weights`` for the min-norm problem of ``gram``.

    With ``v = w^T G w`` (G symmetrised), optimal weights satisfy ``(Gw)_i >= v`` for all
    i, with equality where ``w_i > 0``. The residual is

        max_i max((v - (Gw)_i)^+, [w_i > 0] |(Gw)_i - v|) / max_i G_ii

    (0 when G = 0), so it is unchanged by scaling G and comparable across problems. It
    does not check that the weights lie on the simplex.

    Args:
        gram: ``[B, K, K]`` or ``[K, K]``, any float dtype.
        weights: ``[B, K]`` or ``[K]`` to match.

    Returns:
        float64 ``[B]`` (or ``[]``). Plain torch ops on any device, no host sync.

    Example:
        >>> g = torch.eye(2)
        >>> kkt_residual(g, torch.tensor([0.5, 0.5]))
        tensor(0., dtype=torch.float64)
    """
    _validate_gram(gram)
    check_float("weights", weights)
    if tuple(weights.shape) != tuple(gram.shape[:-1]):
        raise ValueError(
            f"weights must have shape {tuple(gram.shape[:-1])} to match gram "
            f"{tuple(gram.shape)}, got {tuple(weights.shape)}"
        )
    if weights.device != gram.device:
        raise ValueError(
            f"weights is on {weights.device} but gram is on {gram.device}; expected the same device"
        )
    with torch.no_grad():
        if gram.dim() == 2:
            return ref.kkt_residual(gram.unsqueeze(0), weights.unsqueeze(0))[0]
        return ref.kkt_residual(gram, weights)
