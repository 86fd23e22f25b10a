"""Reference gradient Gram matrices: per-tensor dot products in float64, plain PyTorch.

For K objectives and P parameter tensors, ``g[k][p]`` is objective k's gradient of tensor
p. The Gram matrices are

    per_tensor[p, i, j] = <g[i][p], g[j][p]>        total[i, j] = sum_p per_tensor[p, i, j]

A ``None`` gradient is a tensor of zeros (its objective does not touch that parameter).
This module is the executable specification (it does no validation beyond what it needs;
``unlearnopt.ops.grad_gram`` validates) and the fallback backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class GradGram(NamedTuple):
    """Gram matrices of K gradients over P tensors.

    Attributes:
        per_tensor: ``[P, K, K]``, ``per_tensor[p, i, j] = <g_i[p], g_j[p]>``.
        total: ``[K, K]``, the Gram of the whole concatenated gradients,
            ``per_tensor.sum(0)`` (summed in float64).
    """

    per_tensor: torch.Tensor
    total: torch.Tensor


def _present(grads: Sequence[Sequence[torch.Tensor | None]], p: int) -> torch.Tensor | None:
    for g in grads:
        if g[p] is not None:
            return g[p]
    return None


def grad_gram(
    grads: Sequence[Sequence[torch.Tensor | None]], out_dtype: torch.dtype | None = None
) -> GradGram:
    """Per-tensor and total Gram matrices, every product computed in float64.

    Args:
        grads: K sequences of P tensors (or ``None`` = zeros), the same shapes per index.
        out_dtype: dtype of the result; default float32, or float64 when any gradient is
            float64 (the tests use float64 to get the oracle at full precision).

    Returns:
        ``GradGram(per_tensor [P, K, K], total [K, K])`` on the gradients' device.
    """
    k = len(grads)
    p_count = len(grads[0]) if k else 0
    device = torch.device("cpu")
    any_f64 = False
    for seq in grads:
        for t in seq:
            if t is not None:
                device = t.device
                any_f64 = any_f64 or t.dtype == torch.float64
    if out_dtype is None:
        out_dtype = torch.float64 if any_f64 else torch.float32
    per_tensor = torch.zeros(p_count, k, k, dtype=torch.float64, device=device)
    for p in range(p_count):
        if _present(grads, p) is None:
            continue
        # Rows of zeros for None: the Gram of [K, n] is then simply X @ X^T.
        rows = [g[p].reshape(-1).double() if g[p] is not None else None for g in grads]
        n = next(r.numel() for r in rows if r is not None)
        x = torch.stack(
            [
                r if r is not None else torch.zeros(n, dtype=torch.float64, device=device)
                for r in rows
            ]
        )
        per_tensor[p] = x @ x.T
    total = per_tensor.sum(0)
    return GradGram(per_tensor.to(out_dtype), total.to(out_dtype))


def gram_to_cosine(gram: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Cosine similarities from Gram matrices ``[..., K, K]`` (same shape and dtype).

    ``cos[i, j] = G[i, j] / sqrt(G[i, i] G[j, j])``, and 0 wherever either norm is 0 (or
    ``<= eps``), so a zero gradient is orthogonal to everything, itself included: the
    diagonal is 1 only where the norm is non-zero. Clamped to [-1, 1] (rounding can push
    a product of nearly parallel vectors a hair past 1).
    """
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    norm = diag.clamp(min=0).sqrt()
    nonzero = norm > eps
    safe = torch.where(nonzero, norm, torch.ones_like(norm))
    # Divide by each norm in turn: their product can underflow for tiny (but non-zero) norms.
    cos = gram / safe.unsqueeze(-1) / safe.unsqueeze(-2)
    ok = nonzero.unsqueeze(-1) & nonzero.unsqueeze(-2)
    cos = torch.where(ok, cos.clamp(-1.0, 1.0), torch.zeros_like(cos))
    # Exactly 1 on the diagonal of non-zero gradients (the division may give 1 - 1ulp).
    eye = torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
    return torch.where(eye & ok, torch.ones_like(cos), cos)
