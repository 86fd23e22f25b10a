"""Fused unlearning cross-entropy: ``nll``, ``ga``, MOLLM's bounded ``uce`` and the token
forget losses ``wga``, ``satimp`` and ``ce_u``.

Every mode shares one gradient shape. With p = softmax(z), y the label, q = 1 - p_y, and
weights and targets detached (no gradient flows through them),

    nll   : loss = lse - z_y                     d/dz = p - e_y
    ga    : loss = z_y - lse                     d/dz = -(p - e_y)
    uce   : loss = -log(1 - a p_y)               d/dz = -(a p_y / (1 - a p_y)) (p - e_y)
    wga   : loss = w log p_y, w = p_y^b1         d/dz = -w (p - e_y)
    satimp: loss = w log p_y, w = p_y^b1 q^b2    d/dz = -w (p - e_y)
    ce_u  : loss = -sum_v r_v log p_v            d/dz = p - r = -(p_y / q) (p - e_y)
            with r = softmax(z with z_y = -inf), the label's mass spread over the others

so every backend computes one row coefficient ``c`` and writes ``scale * c * (p - e_y)``.
(ce_u: r_v = p_v / q for v != y, so p_v - r_v = -(p_y / q) p_v, and at y, p_y - 0.)
wga is Wang et al., 2025 ("Rethinking LLM Unlearning Objectives: A Gradient Perspective and
Go Beyond", ICLR 2025); satimp is Yang et al., 2025 ("Exploring Criteria of Loss Reweighting
to Enhance LLM Unlearning", ICML 2025); ce_u is Yang et al., 2025 ("CE-U: Cross Entropy
Unlearning", arXiv 2503.01224). ce_u's loss is ``-log q + H(r)``, the entropy H(r) of the
label-removed distribution being one more online reduction of the forward pass; its
coefficient -p_y / q grows without bound as p_y -> 1 (its gradient does not: r_v <= 1), so
the kernels fold ``log(p_y / q)`` into the exponent of p_v there. Every weight, target and
1 - p_y is formed from the row statistics without cancellation, accurate near p_y = 0 and 1.

Passes over the logits: the forward reads each row once (online log-sum-exp) and keeps
only the row's statistics; the backward reads the row once more and writes the gradient.
That is the 3-pass floor; computing the gradient during the forward (as Liger-Kernel does)
costs a 4th pass in the backward to apply the upstream gradient, or a host sync to skip
it. The same kernel computes loss and gradient in a single launch when the scale is
known up front (the fused-linear op uses that).
"""

from __future__ import annotations

import torch

from unlearnopt.ops._backend import choose_backend, float64_gap, kernel
from unlearnopt.ops._checks import (
    check_alpha,
    check_choice,
    check_exponent,
    check_float,
    check_labels,
    check_same_device,
)
from unlearnopt.reference import unlearning_cross_entropy as ref

MODES = ref.MODES
REDUCTIONS = ref.REDUCTIONS
MODE_ID = {"nll": 0, "ga": 1, "uce": 2, "wga": 3, "satimp": 4, "ce_u": 5}


# Row kernel contract, the same for ``kernel("unlearning_cross_entropy", "triton"|"native")``:
# ``rows(logits [N, V] (row stride free, unit column stride), labels [N] int64, mode_id, alpha,
# ignore_index, stats_in [N, 3] f64 | None, grad_scale f32 (1 or N elements) | None,
# grad_out [N, V] | None, beta1=1.0, beta2=1.0) -> (loss [N] f32, stats [N, 3] f64)``.
# A row's stats are ``(lse, 1 - p_y, h)``, the second summed over the other classes (no
# cancellation near p_y = 1), h the entropy of softmax over the other classes (ce_u's loss
# only; 0 in the other modes, which skip its reduction); ``stats_in`` (from an earlier call
# of the same mode) skips the reduction pass; the gradient reads lse and 1 - p_y only. With
# ``grad_scale``
# it also writes ``grad_scale[i] * c_i * (p_i - e_y)`` into ``grad_out`` (which may be
# ``logits`` itself). Ignored rows get loss 0, stats 0 and zeros, whatever their logits; a
# NaN/+inf logit in a kept row gives NaN; a label outside [0, V) gives a NaN loss and
# gradient row.
OP = "unlearning_cross_entropy"
#: Columns of a row's statistics in that contract: (lse, 1 - p_y, h).
STATS_WIDTH = 3


def validate_options(mode, ignore_index, reduction, alpha, beta1=1.0, beta2=1.0) -> None:
    check_choice("mode", mode, MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_alpha(alpha)
    check_exponent("beta1", beta1)
    check_exponent("beta2", beta2)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def validate(logits, labels, mode, ignore_index, reduction, alpha, beta1, beta2) -> None:
    check_float("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    validate_options(mode, ignore_index, reduction, alpha, beta1, beta2)
    check_same_device(logits=logits, labels=labels)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)


def upstream_scale(grad_output: torch.Tensor, reduction: str, count: torch.Tensor) -> torch.Tensor:
    """The per-row factor of the backward, kept on the device (no ``.item()``)."""
    g = grad_output.float()
    if reduction == "none":
        return g.reshape(-1).contiguous()
    if reduction == "mean":
        g = g / count.clamp(min=1)
    return g.reshape(1)


def reduce_rows(loss_rows: torch.Tensor, reduction: str, count: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / count.clamp(min=1) if reduction == "mean" else total


class UnlearningCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, labels, mode, params, ignore_index, reduction, backend, inplace_backward
    ):
        vocab = logits.shape[-1]
        logits2d = logits.reshape(-1, vocab)
        if logits2d.stride(-1) != 1:
            logits2d = logits2d.contiguous()
        labels1d = labels.reshape(-1).long()
        rows = kernel(OP, backend)
        alpha, beta1, beta2 = params
        loss_rows, stats = rows(
            logits2d, labels1d, MODE_ID[mode], alpha, ignore_index, None, None, None, beta1, beta2
        )
        count = (labels1d != ignore_index).sum()
        ctx.save_for_backward(logits2d, labels1d, stats, count)
        ctx.config = (
            mode,
            params,
            ignore_index,
            reduction,
            backend,
            inplace_backward,
            logits.shape,
        )
        out = reduce_rows(loss_rows, reduction, count)
        return out.reshape(labels.shape) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_output):
        mode, params, ignore_index, reduction, backend, inplace_backward, shape = ctx.config
        alpha, beta1, beta2 = params
        logits2d, labels1d, stats, count = ctx.saved_tensors
        grad = logits2d if inplace_backward else torch.empty_like(logits2d)
        scale = upstream_scale(grad_output, reduction, count)
        kernel(OP, backend)(
            logits2d, labels1d, MODE_ID[mode], alpha, ignore_index, stats, scale, grad, beta1, beta2
        )
        return grad.view(shape), None, None, None, None, None, None, None


@torch.compiler.disable
def unlearning_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "nll",
    ignore_index: int = -100,
    reduction: str = "mean",
    alpha: float = 0.5,
    beta1: float = 1.0,
    beta2: float = 1.0,
    *,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy for unlearning, fused: loss and gradient without materialising softmax.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, float32 / bfloat16 / float16 (math is float32).
            Labels are *not* shifted here: position t is scored against ``labels[t]``.
        labels: ``[N]`` or ``[B, T]`` int64/int32, in ``[0, V)`` or ``ignore_index``
            (range read on the host for CPU tensors only; elsewhere a label out of range
            gives that token a NaN loss, see ``unlearnopt.ops._checks``).
        mode: ``"nll"`` (-log p_y, plain CE), ``"ga"`` (+log p_y, gradient ascent as a loss),
            ``"uce"`` (-log(1 - alpha p_y), MOLLM's bounded unlearning CE), ``"wga"``
            (p_y^beta1 log p_y, weight detached), ``"satimp"`` (p_y^beta1 (1 - p_y)^beta2
            log p_y, weight detached) or ``"ce_u"`` (cross-entropy against the detached
            softmax of the logits with the label's set to -inf; needs another class with a
            finite logit). Formulas and papers: the module docstring.
        ignore_index: label value that contributes no loss and no gradient (exactly 0,
            whatever that row's logits hold; a NaN/Inf logit in a kept row gives NaN).
        reduction: ``"mean"`` over non-ignored tokens (0 if there are none), ``"sum"``, or
            ``"none"`` (float32, shape of ``labels``, 0 at ignored tokens).
        alpha: the ``uce`` parameter in (0, 1]; the loss is bounded by -log(1 - alpha).
        beta1: the exponent of p_y in the ``wga`` and ``satimp`` weights, a finite number >= 0
            (``0 ** 0 = 1``). The papers' defaults (wga 1; satimp 5) live in
            ``unlearnopt.objectives``.
        beta2: the exponent of 1 - p_y in the ``satimp`` weight, >= 0 (satimp's default 1).
        inplace_backward: write the gradient into the logits buffer during backward (extra
            memory O(N) instead of O(N·V)). Only when nothing else reads these logits after
            this loss's backward.
        backend: ``"auto"`` / ``"triton"`` / ``"native"`` / ``"reference"``; default from
            ``UNLEARNOPT_BACKEND``. float64 logits run on the reference: ``auto`` takes it
            (one warning), a named kernel backend raises ``ValueError``.

    Returns:
        float32 loss. Equivalent plain PyTorch for ``mode="nll"``:
        ``F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)``.

    Example:
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> unlearning_cross_entropy(logits, torch.tensor([1, 2, -100, 3]), mode="uce").backward()
    """
    validate(logits, labels, mode, ignore_index, reduction, alpha, beta1, beta2)
    chosen = choose_backend(OP, backend, logits.device, float64_gap(logits))
    params = (float(alpha), float(beta1), float(beta2))
    if chosen == "reference":
        return ref.unlearning_cross_entropy(logits, labels, mode, ignore_index, reduction, *params)
    return UnlearningCrossEntropyFunction.apply(
        logits, labels, mode, params, ignore_index, reduction, chosen, inplace_backward
    )
