"""The objectives' losses on an objective context, on the cheapest path it offers.

A context (``unlearnopt.contract.ObjectiveContext``) offers the trained model's output two
ways: ``ctx.head`` (:class:`~unlearnopt.output_head.HeadInputs`, the fused-linear path:
no ``[B, T, V]`` logits; None where the unlearner runs without it) and ``ctx.logits``
(``[B, T, V]``). These functions use the head's inputs when the context has them (and,
for the losses against the reference, the reference's too) and the logits otherwise; the
two give the same values and gradients (tested). A context without the attributes
``head`` / ``ref_head`` / ``ref_sequence_log_prob`` (e.g. one built by hand) gets the
logits path.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearnopt.objectives.fused_linear import (
    ce_u_loss_from_hidden,
    masked_kl_from_hidden,
    npo_loss_from_hidden,
    npo_loss_from_log_probs,
    satimp_loss_from_hidden,
    sequence_log_prob_from_hidden,
    simnpo_loss_from_hidden,
    token_loss_from_hidden,
    undial_loss_from_hidden,
    wga_loss_from_hidden,
)
from unlearnopt.objectives.kl import kl_to_reference
from unlearnopt.objectives.shift import IGNORE_INDEX, shift_labels
from unlearnopt.objectives.simnpo import simnpo_loss
from unlearnopt.objectives.token import sequence_log_prob, token_loss
from unlearnopt.objectives.weighted_token import ce_u_loss, satimp_loss, undial_loss, wga_loss
from unlearnopt.ops.masked_kl import masked_kl


def _heads(ctx: Any, need_ref: bool):
    head = getattr(ctx, "head", None)
    if head is None:
        return None, None
    if not need_ref:
        return head, None
    ref_head = getattr(ctx, "ref_head", None)
    return (head, ref_head) if ref_head is not None else (None, None)


def token_loss_of(
    ctx: Any, mode: str = "nll", alpha: float = 0.5, *, backend: str | None = None
) -> torch.Tensor:
    """``token_loss(ctx.logits, ctx.labels, mode, alpha)``: mean over the labelled tokens
    (``backend="reference"``: plain PyTorch on either path, differentiable more than once)."""
    head, _ = _heads(ctx, need_ref=False)
    if head is not None:
        return token_loss_from_hidden(head, ctx.labels, mode, alpha, backend=backend)
    if backend is None:
        return token_loss(ctx.logits, ctx.labels, mode, alpha)
    return token_loss(ctx.logits, ctx.labels, mode, alpha, backend=backend)


def wga_loss_of(ctx: Any, beta: float = 1.0) -> torch.Tensor:
    """``wga_loss(ctx.logits, ctx.labels, beta)``: mean over the labelled tokens."""
    head, _ = _heads(ctx, need_ref=False)
    if head is not None:
        return wga_loss_from_hidden(head, ctx.labels, beta)
    return wga_loss(ctx.logits, ctx.labels, beta)


def satimp_loss_of(ctx: Any, beta1: float = 5.0, beta2: float = 1.0) -> torch.Tensor:
    """``satimp_loss(ctx.logits, ctx.labels, beta1, beta2)``: mean over the labelled tokens."""
    head, _ = _heads(ctx, need_ref=False)
    if head is not None:
        return satimp_loss_from_hidden(head, ctx.labels, beta1, beta2)
    return satimp_loss(ctx.logits, ctx.labels, beta1, beta2)


def ce_u_loss_of(ctx: Any) -> torch.Tensor:
    """``ce_u_loss(ctx.logits, ctx.labels)``: mean over the labelled tokens."""
    head, _ = _heads(ctx, need_ref=False)
    if head is not None:
        return ce_u_loss_from_hidden(head, ctx.labels)
    return ce_u_loss(ctx.logits, ctx.labels)


def reference_sequence_log_prob(ctx: Any) -> torch.Tensor:
    """The reference's ``log pi_ref(y_i | x_i)``, ``[B]``, no grad: the context's (possibly
    cached) ``ref_sequence_log_prob`` when it has one, else computed from its reference
    head inputs or logits."""
    cached = getattr(ctx, "ref_sequence_log_prob", None)
    if cached is not None:
        return cached
    with torch.no_grad():
        ref_head = (
            getattr(ctx, "ref_head", None) if getattr(ctx, "head", None) is not None else None
        )
        if ref_head is not None:
            return sequence_log_prob_from_hidden(ref_head, ctx.labels)
        return sequence_log_prob(ctx.ref_logits.detach(), ctx.labels)


def npo_loss_of(ctx: Any, beta: float = 0.1) -> torch.Tensor:
    """``npo_loss(ctx.logits, ctx.ref_logits, ctx.labels, beta)``: mean over sequences."""
    ref_log_prob = reference_sequence_log_prob(ctx)
    head, _ = _heads(ctx, need_ref=False)
    if head is not None:
        return npo_loss_from_hidden(head, ref_log_prob, ctx.labels, beta)
    return npo_loss_from_log_probs(sequence_log_prob(ctx.logits, ctx.labels), ref_log_prob, beta)


def simnpo_loss_of(ctx: Any, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """``simnpo_loss(ctx.logits, ctx.labels, beta, gamma)``: mean over sequences."""
    head, _ = _heads(ctx, need_ref=False)
    if head is not None:
        return simnpo_loss_from_hidden(head, ctx.labels, beta, gamma)
    return simnpo_loss(ctx.logits, ctx.labels, beta, gamma)


def sequence_log_prob_of(ctx: Any) -> torch.Tensor:
    """``sequence_log_prob(ctx.logits, ctx.labels)``: ``[B]``, with grad."""
    head, _ = _heads(ctx, need_ref=False)
    if head is not None:
        return sequence_log_prob_from_hidden(head, ctx.labels)
    return sequence_log_prob(ctx.logits, ctx.labels)


def dpo_loss_of(preferred: Any, dispreferred: Any, beta: float = 0.1) -> torch.Tensor:
    """``dpo_loss`` of two contexts paired row by row (the preferred and the dispreferred
    answers): mean over pairs of ``(2 / beta) softplus(-beta r)``, r the difference of the
    two log-ratios to the reference."""
    if not isinstance(beta, (int, float)) or not float(beta) > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    win = sequence_log_prob_of(preferred) - reference_sequence_log_prob(preferred)
    lose = sequence_log_prob_of(dispreferred) - reference_sequence_log_prob(dispreferred)
    if win.shape != lose.shape:
        raise ValueError(
            f"the preferred batch has {win.shape[0]} sequences and the dispreferred "
            f"{lose.shape[0]}; DPO needs one preferred per dispreferred"
        )
    return (2.0 / beta) * torch.nn.functional.softplus(-beta * (win - lose)).mean()


def kl_to_reference_of(ctx: Any) -> torch.Tensor:
    """``kl_to_reference(ctx.logits, ctx.ref_logits, ctx.labels)``: mean forward KL
    (reference || model) over the labelled tokens."""
    head, ref_head = _heads(ctx, need_ref=True)
    if head is not None:
        return masked_kl_from_hidden(head, ref_head, shift_labels(ctx.labels) != IGNORE_INDEX)
    return kl_to_reference(ctx.logits, ctx.ref_logits, ctx.labels)


def masked_kl_of(
    ctx: Any,
    token_mask: torch.Tensor,
    vocab_mask: torch.Tensor | None = None,
    direction: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """``masked_kl`` of the model against the reference, mean over ``token_mask``.

    Args:
        token_mask: ``[B, T]`` in the logits' frame (m_t weights position t's prediction).
        vocab_mask: ``[V]`` or None; direction, temperature: as in ``masked_kl``.
    """
    head, ref_head = _heads(ctx, need_ref=True)
    if head is not None:
        return masked_kl_from_hidden(head, ref_head, token_mask, vocab_mask, direction, temperature)
    logits = ctx.logits
    vocab = logits.shape[-1]
    return masked_kl(
        logits.reshape(-1, vocab),
        ctx.ref_logits.reshape(-1, vocab),
        token_mask=token_mask.reshape(-1),
        vocab_mask=vocab_mask,
        direction=direction,
        reduction="mean",
        temperature=temperature,
    )


def undial_loss_of(ctx: Any, gamma: float = 10.0) -> torch.Tensor:
    """``undial_loss(ctx.logits, ctx.ref_logits, ctx.labels, gamma)``: mean over the labelled
    tokens of the cross-entropy against ``softmax(z_ref - gamma e_y)``."""
    head, ref_head = _heads(ctx, need_ref=True)
    if head is not None:
        return undial_loss_from_hidden(head, ref_head, ctx.labels, gamma)
    return undial_loss(ctx.logits, ctx.ref_logits, ctx.labels, gamma)


def vocab_size_of(ctx: Any) -> int:
    """The model's vocabulary size (from the head's weight, or the logits)."""
    head = getattr(ctx, "head", None)
    return int(head.weight.shape[0]) if head is not None else int(ctx.logits.shape[-1])
