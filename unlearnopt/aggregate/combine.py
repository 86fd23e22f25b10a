"""Coefficients -> one combined gradient: ``d[p] = sum_i c[p, i] * g_i[p]``.

Separate from the weightings (which only see Gram matrices), so any weighting combines
with any granularity. Coefficients stay on the device (0-dim tensor factors, no host sync).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def combine_gradients(
    grads: Sequence[Sequence[torch.Tensor | None]],
    coefficients: torch.Tensor,
    *,
    inplace: bool = False,
) -> list[torch.Tensor | None]:
    """The combined gradient, one tensor per parameter.

    Args:
        grads: K sequences of P gradients (``None`` = zeros), same shapes per index.
        coefficients: ``[K]`` or ``[1, K]`` (one set for every tensor, "global") or
            ``[P, K]`` (one set per tensor, "per_tensor"), any float dtype.
        inplace: reuse the first present gradient's buffer of each tensor for the result
            (saves one gradient copy; the K inputs must not be read afterwards).

    Returns:
        P tensors in the gradients' dtype (``None`` where every objective's gradient is None).
    """
    k = len(grads)
    if k == 0:
        raise ValueError("grads must hold at least one objective's gradients")
    p_count = len(grads[0])
    if any(len(g) != p_count for g in grads):
        raise ValueError(
            f"every objective needs the same number of gradients, got {[len(g) for g in grads]}"
        )
    c = coefficients.reshape(-1, k) if coefficients.dim() == 1 else coefficients
    if c.dim() != 2 or c.shape[-1] != k or c.shape[0] not in (1, p_count):
        raise ValueError(
            f"coefficients must be [K], [1, K] or [P, K] with K={k}, P={p_count}; "
            f"got shape {tuple(coefficients.shape)}"
        )
    out: list[torch.Tensor | None] = []
    rows = c.unbind(0)  # 0-dim device tensors: no .item()
    for p in range(p_count):
        row = rows[0] if c.shape[0] == 1 else rows[p]
        factors = row.unbind(0)
        d = None
        for i in range(k):
            g = grads[i][p]
            if g is None:
                continue
            f = factors[i]
            if d is None:
                d = g.mul_(f) if inplace else g * f
            else:
                d.addcmul_(g, f)
        out.append(d)
    return out
