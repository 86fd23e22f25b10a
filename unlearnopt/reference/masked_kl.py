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
"""

from __future__ import annotations

import torch

DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    vocab_mask: torch.Tensor | None,
    direction: str,
    temperature: float,
) -> torch.Tensor:
    """Per-token masked KL ``[N]`` from logits and ref_logits ``[N, V]`` (no token mask)."""
    dtype = _compute_dtype(logits)
    log_p = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits.detach().to(dtype) / temperature, dim=-1)
    if direction == "forward":
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
) -> torch.Tensor:
    """logits, ref_logits ``[..., V]``; token_mask ``[...]`` or ``[N]``; vocab_mask ``[V]`` -> loss.

    ``reduction="none"`` returns ``m_t * KL_t`` with the shape of ``logits.shape[:-1]``.
    """
    vocab = logits.shape[-1]
    flat, ref_flat = logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab)
    if token_mask is not None:
        # Masked tokens see zero logits: their gradient is exactly 0 even for NaN logits
        # (0 * NaN through the softmax backward would be NaN), as in the fused kernels.
        off = token_mask.reshape(-1, 1) == 0
        flat = torch.where(off, torch.zeros_like(flat), flat)
        ref_flat = torch.where(off, torch.zeros_like(ref_flat), ref_flat)
    kl = token_kl(flat, ref_flat, vocab_mask, direction, temperature)
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
) -> torch.Tensor:
    """Masked KL of ``hidden @ weight.T + bias`` vs ``ref_hidden @ ref_weight.T + ref_bias``."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    with torch.no_grad():
        ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias)
    return masked_kl(logits, ref_logits, token_mask, vocab_mask, direction, reduction, temperature)
