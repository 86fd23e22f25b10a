"""The objectives' losses from the head's inputs, through the fused-linear ops.

Each function here equals its logits counterpart on ``logits = hidden @ weight.T + bias``
(the :class:`~unlearnopt.output_head.HeadInputs` of the model), in value and gradient, but
computes the logits a chunk of tokens at a time, so no ``[B, T, V]`` tensor exists:

=============================================  ============================================
from the head's inputs                         logits counterpart
=============================================  ============================================
``token_loss_from_hidden(h, labels, mode)``     ``token_loss(logits, labels, mode)``
``wga_loss_from_hidden(h, labels, beta)``       ``wga_loss(logits, labels, beta)``
``satimp_loss_from_hidden(h, labels, b1, b2)``  ``satimp_loss(logits, labels, b1, b2)``
``ce_u_loss_from_hidden(h, labels)``            ``ce_u_loss(logits, labels)``
``sequence_log_prob_from_hidden(h, labels)``    ``sequence_log_prob(logits, labels)``
``npo_loss_from_hidden(h, ref_lp, labels)``     ``npo_loss(logits, ref_logits, labels)``
``simnpo_loss_from_hidden(h, labels)``          ``simnpo_loss(logits, labels)``
``kl_to_reference_from_hidden(h, ref, labels)`` ``kl_to_reference(logits, ref_logits, labels)``
``masked_kl_from_hidden(h, ref, m, u)``         ``masked_kl(logits, ref_logits, m, u)``
``undial_loss_from_hidden(h, ref, labels, g)``  ``undial_loss(logits, ref_logits, labels, g)``
=============================================  ============================================

Labels are unshifted ``[B, T]`` (``-100`` = ignored), as for the logits versions. Under
``torch.autocast`` the head's operands are cast to the autocast dtype, as the model's own
head would compute its logits, and the op runs with autocast off (float32 math inside).
"""

from __future__ import annotations

import contextlib
import math

import torch

from unlearnopt.objectives.shift import IGNORE_INDEX, shift_labels
from unlearnopt.objectives.weighted_token import check_ce_u_vocab
from unlearnopt.ops._checks import check_exponent
from unlearnopt.ops.fused_linear_masked_kl import fused_linear_masked_kl
from unlearnopt.ops.fused_linear_sequence_loss import fused_linear_sequence_loss
from unlearnopt.ops.fused_linear_unlearning_cross_entropy import (
    fused_linear_unlearning_cross_entropy,
)
from unlearnopt.output_head import HeadInputs


def _check(
    head: HeadInputs, labels: torch.Tensor, name: str = "head", labels_name: str = "labels"
) -> None:
    if not isinstance(head, HeadInputs):
        raise TypeError(
            f"{name} must be a HeadInputs (unlearnopt.output_head), got {type(head).__name__}"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{labels_name} must be a [B, T] tensor, got {shape}")
    if head.hidden.dim() != 3 or tuple(head.hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"{name}.hidden has shape {tuple(head.hidden.shape)}; expected "
            f"[B, T, H] with [B, T] = {labels_name}' {tuple(labels.shape)}"
        )


def _check_beta(beta) -> None:
    if not isinstance(beta, (int, float)) or not float(beta) > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")


def _operands(head: HeadInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden, weight, bias)`` in one dtype: autocast's if it is on, else the weight's."""
    device_type = head.hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    return head.hidden.to(dtype), head.weight.to(dtype), bias


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def token_loss_from_hidden(
    head: HeadInputs,
    labels: torch.Tensor,
    mode: str = "nll",
    alpha: float = 0.5,
    *,
    beta1: float = 1.0,
    beta2: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean next-token loss over the non-ignored tokens (``nll``: -log p(y), ``ga``:
    +log p(y), ``uce``: -log(1 - alpha p(y)); and any other mode of
    ``unlearnopt.ops.unlearning_cross_entropy``: ``wga``, ``satimp``, ``ce_u``).

    Args:
        head: the model's head inputs, ``hidden [B, T, H]``.
        labels: ``[B, T]`` unshifted, -100 = ignored.
        mode, alpha: as in ``token_loss``.
        beta1, beta2: the ``wga`` / ``satimp`` exponents, as in the op.
        backend: the op's backend (``"reference"``: plain PyTorch, differentiable twice).

    Returns:
        0-dim float32 (float64 for float64 operands); 0 if no token counts.
    """
    _check(head, labels)
    hidden, weight, bias = _operands(head)
    with _autocast_off(hidden.device.type):
        return fused_linear_unlearning_cross_entropy(
            hidden,
            weight,
            shift_labels(labels),
            bias,
            mode=mode,
            ignore_index=IGNORE_INDEX,
            reduction="mean",
            alpha=alpha,
            beta1=beta1,
            beta2=beta2,
            backend=backend,
        )


def wga_loss_from_hidden(
    head: HeadInputs, labels: torch.Tensor, beta: float = 1.0, *, backend: str | None = None
) -> torch.Tensor:
    """``wga_loss`` (mean of ``p_y**beta`` (detached) ``* log p_y``) from the head's inputs."""
    beta = check_exponent("beta", beta)
    return token_loss_from_hidden(head, labels, "wga", beta1=beta, backend=backend)


def satimp_loss_from_hidden(
    head: HeadInputs,
    labels: torch.Tensor,
    beta1: float = 5.0,
    beta2: float = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``satimp_loss`` (mean of ``p_y**beta1 (1 - p_y)**beta2`` (detached) ``* log p_y``)
    from the head's inputs."""
    beta1 = check_exponent("beta1", beta1)
    beta2 = check_exponent("beta2", beta2)
    return token_loss_from_hidden(head, labels, "satimp", beta1=beta1, beta2=beta2, backend=backend)


def ce_u_loss_from_hidden(
    head: HeadInputs, labels: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """``ce_u_loss`` (mean cross-entropy against ``softmax(z with z_y = -inf)``, detached)
    from the head's inputs."""
    if isinstance(head, HeadInputs):
        check_ce_u_vocab(head.weight.shape[0])
    return token_loss_from_hidden(head, labels, "ce_u", backend=backend)


def sequence_log_prob_from_hidden(head: HeadInputs, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence ``log pi(y_i | x_i) = sum_t log p(labels[i, t + 1])`` over the
    non-ignored tokens, ``[B]`` float32 (float64 for float64 operands)."""
    _check(head, labels)
    hidden, weight, bias = _operands(head)
    with _autocast_off(hidden.device.type):
        nll = fused_linear_unlearning_cross_entropy(
            hidden,
            weight,
            shift_labels(labels),
            bias,
            mode="nll",
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
    return -nll.sum(dim=1)


def npo_loss_from_log_probs(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """``mean_i (2 / beta) softplus(beta (log_prob_i - ref_log_prob_i))``; ``[B]`` each,
    ``ref_log_prob`` is treated as a constant."""
    _check_beta(beta)
    if log_prob.shape != ref_log_prob.shape or log_prob.dim() != 1:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)} and ref_log_prob "
            f"{tuple(ref_log_prob.shape)} must both be [B]"
        )
    log_ratio = log_prob - ref_log_prob.detach().to(log_prob.dtype)
    return (2.0 / beta) * torch.nn.functional.softplus(beta * log_ratio).mean()


def _sequence_loss_from_hidden(head: HeadInputs, labels: torch.Tensor, terms) -> torch.Tensor:
    """``sum_b terms(lp, rows)_b`` over the per-sequence log-probabilities of ``head``,
    scored and differentiated in one pass over the logits (``fused_linear_sequence_loss``)."""
    _check(head, labels)
    hidden, weight, bias = _operands(head)
    with _autocast_off(hidden.device.type):
        return fused_linear_sequence_loss(
            hidden, weight, shift_labels(labels), terms, bias, ignore_index=IGNORE_INDEX
        )


def npo_loss_from_hidden(
    head: HeadInputs, ref_log_prob: torch.Tensor, labels: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """Mean NPO loss over sequences, ``(2 / beta) log(1 + (pi_theta / pi_ref) ** beta)``.

    Each sequence's term and its slope are formed as soon as its tokens are scored, so the
    logits are computed once (no recomputation in the backward).

    Args:
        head: the trained model's head inputs.
        ref_log_prob: ``[B]`` the reference's per-sequence log-probabilities
            (:func:`sequence_log_prob_from_hidden` of the reference's head inputs, no grad):
            a ``[B]`` vector is all NPO needs of the reference, so it is what gets cached.
        labels: ``[B, T]`` unshifted labels.
        beta: > 0 (paper: 0.1).
    """
    _check_beta(beta)
    batch = labels.shape[0] if isinstance(labels, torch.Tensor) else 0
    if not isinstance(ref_log_prob, torch.Tensor) or tuple(ref_log_prob.shape) != (batch,):
        shape = (
            tuple(ref_log_prob.shape)
            if isinstance(ref_log_prob, torch.Tensor)
            else type(ref_log_prob).__name__
        )
        raise ValueError(f"ref_log_prob must be [B] = ({batch},), got {shape}")
    ref_lp = ref_log_prob.detach()
    scale = 2.0 / beta / max(batch, 1)

    def terms(lp: torch.Tensor, rows: slice) -> torch.Tensor:
        return scale * torch.nn.functional.softplus(beta * (lp - ref_lp[rows]))

    return _sequence_loss_from_hidden(head, labels, terms)


def simnpo_loss_from_hidden(
    head: HeadInputs, labels: torch.Tensor, beta: float = 2.5, gamma: float = 0.0
) -> torch.Tensor:
    """Mean SimNPO loss over sequences, ``(2 / beta) softplus((beta / |y|) log pi + gamma)``
    (``simnpo_loss`` from the head's inputs; one pass over the logits).

    Args:
        head: the trained model's head inputs; labels: ``[B, T]`` unshifted.
        beta: > 0 (paper: 2.5); gamma: >= 0 (paper: 0).
    """
    _check_beta(beta)
    if not isinstance(gamma, (int, float)) or not float(gamma) >= 0:
        raise ValueError(f"gamma must be a non-negative number, got {gamma!r}")
    length = (shift_labels(labels) != IGNORE_INDEX).sum(dim=1).clamp(min=1).float()
    scale = 2.0 / beta / max(labels.shape[0], 1)

    def terms(lp: torch.Tensor, rows: slice) -> torch.Tensor:
        return scale * torch.nn.functional.softplus(beta * lp / length[rows] + gamma)

    return _sequence_loss_from_hidden(head, labels, terms)


def masked_kl_from_hidden(
    head: HeadInputs,
    ref_head: HeadInputs,
    token_mask: torch.Tensor,
    vocab_mask: torch.Tensor | None = None,
    direction: str = "forward",
    temperature: float = 1.0,
    *,
    ref_labels: torch.Tensor | None = None,
    ref_label_shift: float = 0.0,
    cross_entropy: bool = False,
) -> torch.Tensor:
    """``sum_t m_t KL_t / #(m_t != 0)`` between the model's and the reference's next-token
    distributions (``masked_kl`` semantics: u multiplies the vocabulary terms, no
    renormalisation; both logit sets divided by ``temperature``).

    Args:
        head, ref_head: the model's and the reference's head inputs (``[B, T, H]`` and
            ``[B, T, H_ref]``); nothing flows back into ``ref_head``.
        token_mask: ``[B, T]`` in the logits' frame (m_t weights position t's prediction).
        vocab_mask: ``[V]`` or None.
        direction: ``"forward"`` KL(p_ref || p_theta) or ``"reverse"``.
        ref_labels, ref_label_shift, cross_entropy: as in ``masked_kl`` (``ref_labels``
            ``[B, T]`` in the logits' frame); each chunk's reference logits are lowered in
            place, so no ``[B, T, V]`` tensor is built for the reference either.
    """
    _check(head, token_mask, labels_name="token_mask")
    _check(ref_head, token_mask, "ref_head", "token_mask")
    hidden, weight, bias = _operands(head)
    rh, rw, rb = _operands(ref_head.detach())
    with _autocast_off(hidden.device.type):
        return fused_linear_masked_kl(
            hidden,
            weight,
            rh,
            rw,
            bias,
            rb,
            token_mask=token_mask,
            vocab_mask=vocab_mask,
            direction=direction,
            reduction="mean",
            temperature=temperature,
            ref_labels=ref_labels,
            ref_label_shift=ref_label_shift,
            cross_entropy=cross_entropy,
        )


def kl_to_reference_from_hidden(
    head: HeadInputs, ref_head: HeadInputs, labels: torch.Tensor
) -> torch.Tensor:
    """Mean forward KL(p_ref || p_theta) over the tokens with a (shifted) label."""
    _check(head, labels)
    return masked_kl_from_hidden(head, ref_head, shift_labels(labels) != IGNORE_INDEX)


def undial_loss_from_hidden(
    head: HeadInputs, ref_head: HeadInputs, labels: torch.Tensor, gamma: float = 10.0
) -> torch.Tensor:
    """UNDIAL's loss: mean over the labelled tokens of ``-sum_v q_v log p_v`` with
    ``q = softmax(z_ref - gamma e_y)`` (the reference's logits with the label logit lowered
    by ``gamma``; Dong et al., 2024, arXiv 2402.10052).

    Args:
        head, ref_head: the model's and the reference's head inputs (nothing flows back
            into ``ref_head``).
        labels: ``[B, T]`` unshifted, -100 = ignored.
        gamma: finite, >= 0 (open-unlearning's default: 10).
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if not (math.isfinite(float(gamma)) and float(gamma) >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    _check(head, labels)
    y = shift_labels(labels)
    return masked_kl_from_hidden(
        head,
        ref_head,
        y != IGNORE_INDEX,
        ref_labels=y,
        ref_label_shift=float(gamma),
        cross_entropy=True,
    )
