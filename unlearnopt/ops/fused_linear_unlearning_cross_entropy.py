"""Unlearning cross-entropy of ``hidden @ weight.T + bias`` without the whole ``[N, V]`` logits.

The tokens are processed in chunks: for each chunk the logits are computed, turned into
their gradient *in place* by the row kernel (loss and gradient in one launch), and
immediately contracted into the gradients of hidden, weight and bias. At most
``chunk_size × V`` logits exist at once.

For ``mean``/``sum`` the gradients are computed during the forward with the upstream
gradient taken as 1 and rescaled in the backward (a multiply of ``[N, H]``/``[V, H]``
tensors, cheap next to the matmuls). ``none`` needs the per-token upstream gradient inside
``grad_weight = Σ_i g_i ⊗ h_i``, so the chunks are recomputed in the backward instead.
"""

from __future__ import annotations

import math

import torch

from unlearnopt.ops._backend import choose_backend, float64_gap, kernel
from unlearnopt.ops._checks import check_float, check_labels, check_same_device
from unlearnopt.ops.unlearning_cross_entropy import (
    MODE_ID,
    OP,
    reduce_rows,
    upstream_scale,
    validate_options,
)
from unlearnopt.reference import unlearning_cross_entropy as ref


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Chunk so that one chunk of logits is about as large as ``hidden`` itself (at least 1)."""
    ratio = max(1, math.ceil(vocab_size / max(hidden_size, 1)))
    chunk = max(1, math.ceil(n_tokens / ratio))
    return min(n_tokens, 1 << (chunk - 1).bit_length()) if n_tokens else 1


def _chunked_pass(hidden, weight, bias, labels, cfg, scale, need):
    """Loss per token, and (if ``scale`` is given) the gradients scaled by it.

    hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` | None, labels ``[N]`` int64,
    scale float32 with 1 or N elements | None; ``need`` = (hidden, weight, bias) flags.
    """
    mode, alpha, ignore_index, backend, chunk = cfg
    rows = kernel(OP, backend)
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if scale is not None and need[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if scale is not None and need[1] else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
        if scale is not None and need[2] and bias is not None else None
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h = hidden[start:end]
        logits = torch.nn.functional.linear(h, weight, bias)
        if scale is None:
            loss[start:end] = rows(logits, labels[start:end], MODE_ID[mode], alpha, ignore_index,
                                   None, None, None)[0]
            continue
        part = scale if scale.numel() == 1 else scale[start:end]
        # The kernel overwrites ``logits`` with d(loss)/d(logits), scaled.
        loss[start:end] = rows(logits, labels[start:end], MODE_ID[mode], alpha, ignore_index,
                               None, part, logits)[0]
        if grad_h is not None:
            grad_h[start:end] = logits @ weight
        if grad_w is not None:
            grad_w.add_(logits.t() @ h)
        if grad_b is not None:
            grad_b.add_(logits.float().sum(0))
    return loss, grad_h, grad_w, grad_b


class FusedLinearUnlearningCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, mode, alpha, ignore_index, reduction, backend,
                chunk_size):
        h2d = hidden.reshape(-1, hidden.shape[-1])
        labels1d = labels.reshape(-1).long()
        count = (labels1d != ignore_index).sum()
        chunk = chunk_size or default_chunk_size(h2d.shape[0], h2d.shape[1], weight.shape[0])
        cfg = (mode, alpha, ignore_index, backend, chunk)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[3])
        if reduction == "none" or not any(need):
            loss, gh, gw, gb = _chunked_pass(h2d, weight, bias, labels1d, cfg, None, need)
            ctx.save_for_backward(h2d, weight, bias, labels1d, count)
        else:
            unit = torch.ones(1, dtype=torch.float32, device=hidden.device)
            loss, gh, gw, gb = _chunked_pass(h2d, weight, bias, labels1d, cfg,
                                             upstream_scale(unit, reduction, count), need)
            ctx.save_for_backward(gh, gw, gb)
        ctx.config = (cfg, reduction, need, hidden.shape, weight.dtype,
                      None if bias is None else bias.dtype)
        out = reduce_rows(loss, reduction, count)
        return out.reshape(labels.shape) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_output):
        cfg, reduction, need, hidden_shape, w_dtype, b_dtype = ctx.config
        if reduction == "none":
            h2d, weight, bias, labels1d, count = ctx.saved_tensors
            _, gh, gw, gb = _chunked_pass(h2d, weight, bias, labels1d, cfg,
                                          upstream_scale(grad_output, reduction, count), need)
        else:
            gh, gw, gb = ctx.saved_tensors
            g = grad_output.float()
            gh = None if gh is None else gh * g.to(gh.dtype)
            gw = None if gw is None else gw * g
            gb = None if gb is None else gb * g
        return (None if gh is None else gh.view(hidden_shape),
                None if gw is None else gw.to(w_dtype),
                None, None if gb is None else gb.to(b_dtype),
                None, None, None, None, None, None)


@torch.compiler.disable
def fused_linear_unlearning_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                          labels: torch.Tensor, bias: torch.Tensor | None = None,
                                          mode: str = "nll", ignore_index: int = -100,
                                          reduction: str = "mean", alpha: float = 0.5, *,
                                          chunk_size: int | None = None,
                                          backend: str | None = None) -> torch.Tensor:
    """Unlearning cross-entropy of a linear head, chunked over tokens.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` float (the last hidden states).
        weight: ``[V, H]`` (the lm_head weight), same dtype as ``hidden``.
        labels: ``[N]`` / ``[B, T]`` integer in ``[0, V)`` or ``ignore_index`` (not shifted).
        bias: optional ``[V]``.
        mode, ignore_index, reduction, alpha: as in :func:`unlearning_cross_entropy`.
        chunk_size: tokens per chunk (default: chunk logits about the size of ``hidden``).

    Returns:
        float32 loss, equal to
        ``unlearning_cross_entropy(F.linear(hidden, weight, bias), labels, mode, ...)``.
        Gradients flow to ``hidden``, ``weight`` and ``bias``.

    Example:
        >>> h = torch.randn(6, 8, requires_grad=True); w = torch.randn(50, 8, requires_grad=True)
        >>> fused_linear_unlearning_cross_entropy(h, w, torch.randint(0, 50, (6,)), mode="ga").backward()
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    validate_options(mode, ignore_index, reduction, alpha)
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    check_labels(labels, hidden.shape[:-1], weight.shape[0], ignore_index, "hidden")
    chosen = choose_backend("fused_linear_unlearning_cross_entropy", backend, hidden.device,
                            float64_gap(hidden, weight, bias))
    if chosen == "reference":
        return ref.fused_linear_unlearning_cross_entropy(hidden, weight, labels, bias, mode,
                                                          ignore_index, reduction, alpha)
    return FusedLinearUnlearningCrossEntropyFunction.apply(
        hidden, weight, labels, bias, mode, float(alpha), ignore_index, reduction, chosen,
        chunk_size)
