"""Reference masked KL divergence to the original model: plain PyTorch, autograd does the gradient.

Per token t, with p = softmax(logits_t / T) (the model), q = softmax(ref_logits_t / T) (the
frozen original), vocabulary mask u and token mask m (SIU's dual masked KL):

    forward: KL_t = sum_v u_v q_v (log q_v - log p_v)     = KL(q || p) when u = 1
    reverse: KL_t = sum_v u_v p_v (log p_v - log q_v)     = KL(p || q) when u = 1

The masks multiply the terms; the distributions are NOT renormalised after masking.
Token losses are ``m_t * KL_t`` (exactly 0, with exactly 0 gradient, where ``m_t == 0``,
whatever the logits hold there, NaN included; a non-finite logit of a kept token makes
its loss non-finite). ``mean`` divides the sum by
the number of tokens with ``m_t != 0`` (for a float mask: ``sum_t m_t KL_t / #(m_t != 0)``),
giving 0 when every token is masked. ``ref_logits`` is detached: no gradient reaches it.
float64 inputs are computed in float64, everything else in float32.

Label-lowered target (UNDIAL's adjusted logits): with ``ref_labels`` y and
``ref_label_shift`` gamma, q = softmax((ref_logits_t - gamma e_{y_t}) / T) (a label equal to
-100 lowers nothing). ``cross_entropy=True`` (forward direction only) reports
``CE_t = -sum_v u_v q_v log p_v = KL_t - sum_v u_v q_v log q_v`` instead of the KL: the two
differ by a term that does not depend on the logits, so their gradients are the same.
"""

from __future__ import annotations

import torch

DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("mean", "sum", "none")
#: A ``ref_labels`` entry that lowers no logit.
IGNORE_INDEX = -100


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def lower_label_logits_(rows: torch.Tensor, labels: torch.Tensor, shift: float) -> torch.Tensor:
    """In place: ``rows[i, labels[i]] -= shift`` for every ``labels[i] != IGNORE_INDEX``.

    Args:
        rows: ``[N, V]`` float, a buffer the caller owns (it is modified and returned).
        labels: ``[N]`` integer. A label outside ``[0, V)`` other than ``IGNORE_INDEX`` puts
            NaN in its row (never an out-of-bounds write), so that token's loss is NaN.
        shift: how far each label logit is lowered (in ``rows``' dtype).
    """
    vocab = rows.shape[-1]
    y = labels.reshape(-1, 1).long()
    inside = (y >= 0) & (y < vocab)
    lowered = torch.full(y.shape, -float(shift), dtype=rows.dtype, device=rows.device)
    delta = torch.where(
        inside, lowered, torch.where(y == IGNORE_INDEX, 0.0, float("nan")).to(rows.dtype)
    )
    return rows.scatter_add_(1, torch.where(inside, y, 0), delta)


def token_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    vocab_mask: torch.Tensor | None,
    direction: str,
    temperature: float,
    ref_labels: torch.Tensor | None = None,
    ref_label_shift: float = 0.0,
    cross_entropy: bool = False,
) -> torch.Tensor:
    """Per-token masked KL ``[N]`` from logits and ref_logits ``[N, V]`` (no token mask);
    with ``ref_labels`` ``[N]`` the reference's label logits are lowered by
    ``ref_label_shift`` first; ``cross_entropy``: ``-sum_v u_v q_v log p_v`` instead."""
    dtype = _compute_dtype(logits)
    log_p = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    target = ref_logits.detach().to(dtype)
    if ref_labels is not None:
        target = lower_label_logits_(target.clone(), ref_labels, ref_label_shift)
    log_q = torch.log_softmax(target / temperature, dim=-1)
    if cross_entropy:
        if direction != "forward":
            raise ValueError(f"cross_entropy needs direction='forward', got {direction!r}")
        q = log_q.exp()
        terms = torch.where(q == 0, 0.0, -q * log_p)
    elif direction == "forward":
        terms = log_q.exp() * (log_q - log_p)
    elif direction == "reverse":
        terms = log_p.exp() * (log_p - log_q)
    else:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if vocab_mask is not None:
        terms = terms * vocab_mask.to(dtype)
    return terms.sum(-1)


def reduce_tokens(
    loss: torch.Tensor, token_mask: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """``loss`` ``[N]`` already multiplied by the token mask -> reduced loss."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        count = loss.new_tensor(loss.numel()) if token_mask is None else (token_mask != 0).sum()
        return loss.sum() / count.clamp(min=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def masked_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    vocab_mask: torch.Tensor | None = None,
    direction: str = "forward",
    reduction: str = "mean",
    temperature: float = 1.0,
    *,
    ref_labels: torch.Tensor | None = None,
    ref_label_shift: float = 0.0,
    cross_entropy: bool = False,
) -> torch.Tensor:
    """logits, ref_logits ``[..., V]``; token_mask ``[...]`` or ``[N]``; vocab_mask ``[V]`` -> loss.

    ``reduction="none"`` returns ``m_t * KL_t`` with the shape of ``logits.shape[:-1]``.
    ``ref_labels`` (``[...]`` or ``[N]``), ``ref_label_shift``, ``cross_entropy``: see the
    module docstring.
    """
    vocab = logits.shape[-1]
    flat, ref_flat = logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab)
    if token_mask is not None:
        # Masked tokens see zero logits: their gradient is exactly 0 even for NaN logits
        # (0 * NaN through the softmax backward would be NaN), as in the fused kernels.
        off = token_mask.reshape(-1, 1) == 0
        flat = torch.where(off, torch.zeros_like(flat), flat)
        ref_flat = torch.where(off, torch.zeros_like(ref_flat), ref_flat)
    labels = None if ref_labels is None else ref_labels.reshape(-1)
    kl = token_kl(
        flat, ref_flat, vocab_mask, direction, temperature, labels, ref_label_shift, cross_entropy
    )
    mask = None
    if token_mask is not None:
        mask = token_mask.reshape(-1).to(kl.dtype)
        # where, not a bare product: a masked token contributes exactly 0 (and gradient 0).
        kl = torch.where(mask != 0, kl * mask, torch.zeros_like(kl))
    out = reduce_tokens(kl, mask, reduction)
    return out.reshape(logits.shape[:-1]) if reduction == "none" else out


def fused_linear_masked_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    vocab_mask: torch.Tensor | None = None,
    direction: str = "forward",
    reduction: str = "mean",
    temperature: float = 1.0,
    *,
    ref_labels: torch.Tensor | None = None,
    ref_label_shift: float = 0.0,
    cross_entropy: bool = False,
) -> torch.Tensor:
    """Masked KL of ``hidden @ weight.T + bias`` vs ``ref_hidden @ ref_weight.T + ref_bias``."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    with torch.no_grad():
        ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias)
    return masked_kl(
        logits,
        ref_logits,
        token_mask,
        vocab_mask,
        direction,
        reduction,
        temperature,
        ref_labels=ref_labels,
        ref_label_shift=ref_label_shift,
        cross_entropy=cross_entropy,
    )
