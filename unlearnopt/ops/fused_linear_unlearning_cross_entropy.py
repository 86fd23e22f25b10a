"""Unlearning cross-entropy of ``hidden @ weight.T + bias`` without the whole ``[N, V]`` logits.

The tokens run through the chunk loop shared with the fused-linear masked KL
(``unlearnopt.ops._fused_linear``): per chunk, the logits are computed into a reused
buffer, the row kernel writes the loss and, over the logits, their gradient
``scale * c * (p - e_y)`` in one launch, and the chunk is contracted at once into the
gradients of hidden, weight and bias (weight and bias summed in float32). At most
``chunk_size x V`` logits exist at a time.

The gradients are computed in the forward, with upstream gradient 1, and scaled in the
backward (for ``mean`` by ``1 / #kept tokens`` already in the forward). ``none`` with a
head that needs a gradient is the exception: the per-token upstream factors sit inside
``grad_weight = sum_i g_i h_i^T``, so the forward keeps only the per-token log-sum-exp and
the backward recomputes the chunks with those factors.
"""

from __future__ import annotations

import math

import torch

from unlearnopt.ops._backend import choose_backend, float64_gap, kernel
from unlearnopt.ops._checks import check_labels, check_linear_head, check_same_device
from unlearnopt.ops._fused_linear import chunk_loop, default_chunk_size, take_scaled
from unlearnopt.ops.unlearning_cross_entropy import (
    MODE_ID,
    OP,
    STATS_WIDTH,
    reduce_rows,
    upstream_scale,
    validate_options,
)
from unlearnopt.reference import unlearning_cross_entropy as ref

NAME = "fused_linear_unlearning_cross_entropy"


def _run(h2d, weight, bias, labels1d, cfg, scale, stats_in, want):
    """One pass of the chunk loop: loss and row statistics per token (``[N, 3]`` float64,
    see the row kernel contract in ``unlearnopt.ops.unlearning_cross_entropy``), and the
    gradients when ``scale`` (float32, 1 or N elements) is given. ``stats_in``: the forward's
    statistics (the backward pass)."""
    mode_id, (alpha, beta1, beta2), ignore_index, backend, chunk = cfg
    rows = kernel(OP, backend)
    n = h2d.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=h2d.device)
    stats = torch.empty(n, STATS_WIDTH, dtype=torch.float64, device=h2d.device)

    def step(lo, hi, logits):
        part_stats = None if stats_in is None else stats_in[lo:hi]
        if scale is None:
            loss[lo:hi], stats[lo:hi] = rows(
                logits,
                labels1d[lo:hi],
                mode_id,
                alpha,
                ignore_index,
                part_stats,
                None,
                None,
                beta1,
                beta2,
            )
            return None
        part = scale if scale.numel() == 1 else scale[lo:hi]
        # The kernel overwrites ``logits`` with d(loss)/d(logits), scaled.
        out = rows(
            logits,
            labels1d[lo:hi],
            mode_id,
            alpha,
            ignore_index,
            part_stats,
            part,
            logits,
            beta1,
            beta2,
        )
        if stats_in is None:
            loss[lo:hi], stats[lo:hi] = out
        return logits

    grads = chunk_loop(h2d, weight, bias, chunk, step, want if scale is not None else (False,) * 3)
    return loss, stats, grads


class FusedLinearUnlearningCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        bias,
        mode,
        params,
        ignore_index,
        reduction,
        backend,
        chunk,
        want,
    ):
        h2d = hidden.reshape(-1, hidden.shape[-1])
        labels1d = labels.reshape(-1).long()
        count = (labels1d != ignore_index).sum()
        cfg = (MODE_ID[mode], params, ignore_index, backend, chunk)
        head_grad = want[1] or (want[2] and bias is not None)
        ctx.recompute = reduction == "none" and head_grad
        ctx.head_grads = None
        if not any(want) or ctx.recompute:
            loss, stats, _ = _run(h2d, weight, bias, labels1d, cfg, None, None, want)
            if ctx.recompute:
                ctx.save_for_backward(h2d, weight, bias, labels1d, stats)
        else:
            unit = torch.ones((), dtype=torch.float32, device=hidden.device)
            scale = upstream_scale(unit, "sum" if reduction == "none" else reduction, count)
            loss, _, ctx.head_grads = _run(h2d, weight, bias, labels1d, cfg, scale, None, want)
        ctx.config = (
            cfg,
            reduction,
            want,
            hidden.shape,
            weight.dtype,
            None if bias is None else bias.dtype,
        )
        out = reduce_rows(loss, reduction, count)
        return out.reshape(labels.shape) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_output):
        cfg, reduction, want, hidden_shape, w_dtype, b_dtype = ctx.config
        if ctx.recompute:
            h2d, weight, bias, labels1d, stats = ctx.saved_tensors
            scale = grad_output.float().reshape(-1).contiguous()
            _, _, (gh, gw, gb) = _run(h2d, weight, bias, labels1d, cfg, scale, stats, want)
        else:
            gh, gw, gb = take_scaled(ctx, NAME, grad_output, per_token=reduction == "none")
        return (
            None if gh is None else gh.view(hidden_shape),
            None if gw is None else gw.to(w_dtype),
            None,
            None if gb is None else gb.to(b_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable
def fused_linear_unlearning_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    mode: str = "nll",
    ignore_index: int = -100,
    reduction: str = "mean",
    alpha: float = 0.5,
    beta1: float = 1.0,
    beta2: float = 1.0,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Unlearning cross-entropy of a linear head, chunked over tokens.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` float (the last hidden states).
        weight: ``[V, H]`` (the lm_head weight), same dtype as ``hidden``.
        labels: ``[N]`` / ``[B, T]`` integer in ``[0, V)`` or ``ignore_index`` (not shifted).
        bias: optional ``[V]``.
        mode, ignore_index, reduction, alpha, beta1, beta2: as in
            :func:`unlearning_cross_entropy` (every mode, ``wga``, ``satimp`` and ``ce_u``
            included).
        chunk_size: tokens per chunk (default: about 2^23 logits per chunk, 32 MiB in float32,
            see ``unlearnopt.ops._fused_linear.default_chunk_size``).
        backend: as in :func:`unlearning_cross_entropy` (float64 runs on the reference).

    Returns:
        float32 loss, equal to
        ``unlearning_cross_entropy(F.linear(hidden, weight, bias), labels, mode, ...)``.
        Gradients flow to ``hidden``, ``weight`` and ``bias``. They are computed in the
        forward (except for ``reduction="none"`` with a weight or bias that needs a gradient,
        which the backward recomputes) and handed to autograd once: backpropagating twice
        through one call (``retain_graph=True``) raises ``RuntimeError``.

    Example:
        >>> h = torch.randn(6, 8, requires_grad=True)
        >>> w = torch.randn(50, 8, requires_grad=True)
        >>> labels = torch.randint(0, 50, (6,))
        >>> fused_linear_unlearning_cross_entropy(h, w, labels, mode="ga").backward()
    """
    check_linear_head(hidden, weight, bias)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    validate_options(mode, ignore_index, reduction, alpha, beta1, beta2)
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    check_labels(labels, hidden.shape[:-1], weight.shape[0], ignore_index, "hidden")
    chosen = choose_backend(NAME, backend, hidden.device, float64_gap(hidden, weight, bias))
    if chosen == "reference":
        return ref.fused_linear_unlearning_cross_entropy(
            hidden, weight, labels, bias, mode, ignore_index, reduction, alpha, beta1, beta2
        )
    grad_on = torch.is_grad_enabled()
    want = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    chunk = chunk_size or default_chunk_size(math.prod(hidden.shape[:-1]), weight.shape[0])
    return FusedLinearUnlearningCrossEntropyFunction.apply(
        hidden,
        weight,
        labels,
        bias,
        mode,
        (float(alpha), float(beta1), float(beta2)),
        ignore_index,
        reduction,
        chosen,
        chunk,
        want,
    )
