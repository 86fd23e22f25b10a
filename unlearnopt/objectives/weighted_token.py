"""Token objectives that reweight or redirect each forget token (plain PyTorch).

Per token with (shifted) label y, logits z (one row of V), p = softmax(z) and p_y = p[y];
every weight and every target distribution is detached (no gradient flows through it):

- ``wga`` (weighted gradient ascent; Wang et al., 2025, "Rethinking LLM Unlearning
  Objectives: A Gradient Perspective and Go Beyond", ICLR 2025)::

      loss = w * log p_y,   w = p_y ** beta

  Tokens the model already finds unlikely get little weight, so ascent stops pushing them.
- ``satimp`` (saturation-importance reweighting; Yang et al., 2025, "Exploring Criteria of
  Loss Reweighting to Enhance LLM Unlearning", ICML 2025)::

      loss = w * log p_y,   w = p_y ** beta1 * (1 - p_y) ** beta2

- ``ce_u`` (Yang et al., 2025, "CE-U: Cross Entropy Unlearning", arXiv 2503.01224)::

      q = softmax(z with z_y = -inf)      (the label's mass spread over the other tokens)
      loss = -sum_v q_v log p_v          (cross-entropy of p against q)

  Its gradient in z is p - q: bounded, and zero only when p = q (p_y = 0).
- ``undial`` (Dong et al., 2024, "UNDIAL: Self-Distillation with Adjusted Logits for
  Robust Unlearning in Large Language Models", arXiv 2402.10052)::

      q = softmax(z_ref - gamma * e_y)    (the reference's logits, label logit lowered)
      loss = -sum_v q_v log p_v = KL(q || p) + H(q)

  H(q) does not depend on the trained model, so the gradient, p - q, is the forward KL's:
  it runs on the fused masked KL (``masked_kl`` with ``ref_labels``, ``ref_label_shift`` and
  ``cross_entropy=True``; the value reported is the cross-entropy, as in the paper).

All four are means over the labelled tokens (the labels are shifted inside, -100 =
ignored); 0 when no token counts. Math in float32 (float64 for float64 logits).
"""

from __future__ import annotations

import torch

from unlearnopt.objectives.shift import IGNORE_INDEX, check_logits, shift_labels
from unlearnopt.ops.masked_kl import masked_kl


def _rows(logits: torch.Tensor, labels: torch.Tensor):
    """Labelled rows: log p ``[N, V]`` (float32/64, with grad), labels ``[N]``."""
    check_logits(logits, labels)
    y = shift_labels(labels)
    mask = y != IGNORE_INDEX
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = logits[mask].to(dtype).log_softmax(dim=-1)
    return logp, y[mask], mask


def _mean(per_token: torch.Tensor) -> torch.Tensor:
    """Mean of ``[N]``; 0 (still attached to the graph) when N = 0."""
    return per_token.sum() / max(per_token.numel(), 1)


def _check_exponent(name: str, value) -> float:
    if not isinstance(value, (int, float)) or not float(value) >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Mean over labelled tokens of ``p_y**beta (detached) * log p_y``.

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` unshifted, -100 = ignored.
        beta: the weight's exponent, >= 0 (paper: 1; beta = 0 is plain GA).
    """
    beta = _check_exponent("beta", beta)
    logp, y, _ = _rows(logits, labels)
    logp_y = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    weight = (beta * logp_y.detach()).exp()
    return _mean(weight * logp_y)


def satimp_loss(
    logits: torch.Tensor, labels: torch.Tensor, beta1: float = 5.0, beta2: float = 1.0
) -> torch.Tensor:
    """Mean over labelled tokens of ``p_y**beta1 * (1 - p_y)**beta2 (detached) * log p_y``.

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` unshifted, -100 = ignored.
        beta1, beta2: the exponents, >= 0 (paper / open-unlearning: 5 and 1).
    """
    beta1 = _check_exponent("beta1", beta1)
    beta2 = _check_exponent("beta2", beta2)
    logp, y, _ = _rows(logits, labels)
    logp_y = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    p = logp_y.detach().exp()
    weight = p.pow(beta1) * (1.0 - p).clamp(min=0).pow(beta2)
    return _mean(weight * logp_y)


def _cross_entropy_to(target_logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``-sum_v softmax(target)_v * logp_v`` per row (target detached; -inf entries give 0)."""
    q = target_logits.detach().softmax(dim=-1)
    return -(q * logp.masked_fill(q == 0, 0.0)).sum(dim=-1)


def ce_u_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labelled tokens of the cross-entropy of p against
    ``q = softmax(z with z_y = -inf)`` (q detached).

    Args:
        logits: ``[B, T, V]`` with V >= 2; labels: ``[B, T]`` unshifted, -100 = ignored.
    """
    if logits.dim() == 3 and logits.shape[-1] < 2:
        raise ValueError(f"ce_u needs a vocabulary of at least 2, got V = {logits.shape[-1]}")
    logp, y, mask = _rows(logits, labels)
    target = logits[mask].detach().to(logp.dtype).scatter(-1, y.unsqueeze(-1), float("-inf"))
    return _mean(_cross_entropy_to(target, logp))


def undial_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, gamma: float = 10.0
) -> torch.Tensor:
    """Mean over labelled tokens of the cross-entropy of p against
    ``q = softmax(z_ref - gamma * e_y)`` (fused masked KL plus the target's entropy).

    Args:
        logits: ``[B, T, V]`` the trained model's logits.
        ref_logits: ``[B, T, V]`` the reference's logits (detached inside).
        labels: ``[B, T]`` unshifted, -100 = ignored.
        gamma: how far the label logit is lowered, >= 0 (open-unlearning's default: 10).

    Returns:
        0-dim float32 (float64 for float64 logits, on the reference backend); 0 when no
        token is labelled.
    """
    gamma = _check_exponent("gamma", gamma)
    check_logits(logits, labels)
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} must have the shape of logits "
            f"{tuple(logits.shape)}"
        )
    y = shift_labels(labels).reshape(-1)
    vocab = logits.shape[-1]
    return masked_kl(
        logits.reshape(-1, vocab),
        ref_logits.reshape(-1, vocab),
        token_mask=y != IGNORE_INDEX,
        reduction="mean",
        ref_labels=y,
        ref_label_shift=gamma,
        cross_entropy=True,
    )
