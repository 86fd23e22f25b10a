"""The masked KL of a linear head against a reference head, without either ``[N, V]`` logits.

``fused_linear_masked_kl(h, W, h_ref, W_ref, ...)`` equals ``masked_kl(h @ W.T + b,
h_ref @ W_ref.T + b_ref, ...)`` (the formulas, masks, temperature and label-lowered target
are those of :mod:`unlearnopt.ops.masked_kl`). Both models' logits are computed a chunk of
tokens at a time through the loop shared with the fused-linear cross-entropy
(``unlearnopt.ops._fused_linear``): per chunk the row kernel gives the loss and, over the
model's logits buffer, the gradient, which is contracted at once into the gradients of
hidden, weight and bias. The gradients come from the forward (scaled by the upstream scalar
in the backward), except for ``reduction="none"`` with a head that needs a gradient: the
per-token upstream factors sit inside ``grad_weight = sum_t g_t h_t^T``, so the forward keeps
the per-token statistics and the backward recomputes the chunks with those factors.
"""

from __future__ import annotations

import math

import torch

from unlearnopt.ops._backend import choose_backend, float64_gap, kernel
from unlearnopt.ops._checks import check_choice, check_float, check_same_device
from unlearnopt.ops._fused_linear import chunk_loop, default_chunk_size, take_scaled
from unlearnopt.ops.masked_kl import (
    DIRECTION_ID,
    DIRECTIONS,
    OP,
    REDUCTIONS,
    _check_mask,
    _check_target,
    _check_temperature,
    _entropy_rows,
    _float_mask,
    _labels1d,
    _token_count,
)
from unlearnopt.ops.unlearning_cross_entropy import reduce_rows, upstream_scale
from unlearnopt.reference import masked_kl as ref

NAME = "fused_linear_masked_kl"


def _linear_chunks(
    h2,
    weight,
    bias,
    rh2,
    ref_weight,
    ref_bias,
    tmask,
    vmask,
    ref_labels,
    cfg,
    scale,
    stats_in,
    want,
):
    """One pass: loss [N] and stats [N, 3] per token and, with ``scale`` (float32, 1 or N
    elements), the head's gradients. ``stats_in``: the forward's statistics (backward pass).
    ``ref_labels`` ``[N]`` or None: each chunk's reference logits are lowered in place (in
    the chunk buffer, before the row kernel) by the shift in ``cfg``."""
    direction_id, inv_t, backend, chunk, shift, cross_entropy = cfg
    rows = kernel(OP, backend)
    n, vocab = h2.shape[0], weight.shape[0]
    device = h2.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    stats = (
        stats_in if stats_in is not None else torch.empty(n, 3, dtype=torch.float32, device=device)
    )
    ref_buffer = torch.empty(min(chunk, n), vocab, dtype=rh2.dtype, device=device)
    ref_weight_t = ref_weight.t()
    dtype = torch.promote_types(h2.dtype, rh2.dtype)
    add_entropy = cross_entropy and stats_in is None

    def step(lo, hi, logits):
        ref_logits = ref_buffer[: hi - lo]
        if ref_bias is None:
            torch.mm(rh2[lo:hi], ref_weight_t, out=ref_logits)
        else:
            torch.addmm(ref_bias, rh2[lo:hi], ref_weight_t, out=ref_logits)
        z, r = logits.to(dtype), ref_logits.to(dtype)
        if ref_labels is not None:
            # r is this step's own buffer (or its promoted copy): lowered in place.
            ref.lower_label_logits_(r, ref_labels[lo:hi], shift)
        tm = None if tmask is None else tmask[lo:hi]
        if add_entropy:
            # Before the gradient pass below, which overwrites z (never r).
            entropy = _entropy_rows(rows, r, tm, vmask, inv_t)
        if scale is None:
            loss[lo:hi], stats[lo:hi] = rows(z, r, tm, vmask, direction_id, inv_t, None, None, None)
            if add_entropy:
                loss[lo:hi] += entropy
            return None
        part = scale if scale.numel() == 1 else scale[lo:hi]
        st_in = None if stats_in is None else stats_in[lo:hi]
        # The gradient overwrites this chunk's logits: they are not needed afterwards.
        out = rows(z, r, tm, vmask, direction_id, inv_t, st_in, part, z)
        if stats_in is None:
            loss[lo:hi], stats[lo:hi] = out
            if add_entropy:
                loss[lo:hi] += entropy
        return z

    grads = chunk_loop(h2, weight, bias, chunk, step, want if scale is not None else (False,) * 3)
    return loss, stats, grads


class FusedLinearMaskedKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        tmask,
        vmask,
        direction_id,
        inv_t,
        reduction,
        backend,
        chunk,
        want,
        ref_labels,
        shift,
        cross_entropy,
    ):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        rh2 = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        count = _token_count(tmask, h2.shape[0], hidden.device)
        cfg = (direction_id, inv_t, backend, chunk, shift, cross_entropy)
        heads = (h2, weight, bias, rh2, ref_weight, ref_bias, tmask, vmask, ref_labels, cfg)
        ctx.recompute = reduction == "none" and (want[1] or (want[2] and bias is not None))
        ctx.head_grads = None
        if not any(want) or ctx.recompute:
            loss, stats, _ = _linear_chunks(*heads, None, None, want)
            if ctx.recompute:
                ctx.save_for_backward(
                    h2, weight, bias, rh2, ref_weight, ref_bias, tmask, vmask, ref_labels, stats
                )
        else:
            unit = torch.ones((), dtype=torch.float32, device=hidden.device)
            scale = upstream_scale(unit, "sum" if reduction == "none" else reduction, count)
            loss, _, ctx.head_grads = _linear_chunks(*heads, scale, None, want)
        ctx.config = (
            cfg,
            reduction,
            want,
            hidden.shape,
            weight.dtype,
            None if bias is None else bias.dtype,
        )
        out = reduce_rows(loss, reduction, count)
        return out.reshape(hidden.shape[:-1]) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_output):
        cfg, reduction, want, hidden_shape, w_dtype, b_dtype = ctx.config
        if ctx.recompute:
            *heads, stats = ctx.saved_tensors
            scale = grad_output.float().reshape(-1).contiguous()
            _, _, (gh, gw, gb) = _linear_chunks(*heads, cfg, scale, stats, want)
        else:
            gh, gw, gb = take_scaled(ctx, NAME, grad_output, per_token=reduction == "none")
        return (
            None if gh is None else gh.view(hidden_shape),
            None if gw is None else gw.to(w_dtype),
            None if gb is None else gb.to(b_dtype),
        ) + (None,) * 14


@torch.compiler.disable
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
    chunk_size: int | None = None,
    *,
    ref_labels: torch.Tensor | None = None,
    ref_label_shift: float = 0.0,
    cross_entropy: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Masked KL of ``hidden @ weight.T + bias`` against the original model's
    ``ref_hidden @ ref_weight.T + ref_bias``, without holding either ``[N, V]`` logits whole.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` float (the model's last hidden states).
        weight: ``[V, H]`` lm_head weight; bias: ``[V]`` or None.
        ref_hidden: ``[..., H_ref]`` with the same leading shape as ``hidden``; ref_weight
            ``[V, H_ref]``; ref_bias ``[V]`` or None. Constants: no gradient reaches them.
        token_mask, vocab_mask, direction, reduction, temperature: as in :func:`masked_kl`.
        ref_labels, ref_label_shift, cross_entropy: as in :func:`masked_kl`; the label
            logits are lowered in each chunk's reference logits (no ``[N, V]`` copy).
        chunk_size: tokens per chunk (default: about 2^23 logits per chunk, 32 MiB in float32,
            see ``unlearnopt.ops._fused_linear.default_chunk_size``); peak extra memory: one
            chunk of logits per model and the float32 gradient of ``weight``.
        backend: as in :func:`masked_kl` (float64 runs on the reference).

    Returns:
        float32 loss; gradients for ``hidden``, ``weight`` and ``bias``, computed during the
        forward (one pass, logits chunks overwritten by their gradient, the weight gradient
        summed in float32) and handed to autograd once: backpropagating twice through one
        call (``retain_graph=True``) raises ``RuntimeError``. With ``reduction="none"`` and
        a weight or bias that needs a gradient, the backward recomputes the chunks instead.
        Equivalent:
        ``masked_kl(F.linear(hidden, weight, bias), F.linear(ref_hidden, ref_weight,
        ref_bias).detach(), ...)``.

    Example:
        >>> h = torch.randn(6, 8, requires_grad=True); w = torch.randn(50, 8, requires_grad=True)
        >>> fused_linear_masked_kl(h, w, h.detach(), w.detach() + 0.1).backward()
    """
    for name, t in (
        ("hidden", hidden),
        ("weight", weight),
        ("ref_hidden", ref_hidden),
        ("ref_weight", ref_weight),
    ):
        check_float(name, t)
    if weight.dim() != 2 or ref_weight.dim() != 2:
        raise ValueError(
            f"weight and ref_weight must be [V, H], got {tuple(weight.shape)} and "
            f"{tuple(ref_weight.shape)}"
        )
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)}; expected [..., "
            f"{weight.shape[1]}] (weight is {tuple(weight.shape)})"
        )
    if ref_hidden.shape[:-1] != hidden.shape[:-1] or ref_hidden.shape[-1] != ref_weight.shape[1]:
        raise ValueError(
            f"ref_hidden has shape {tuple(ref_hidden.shape)}; expected "
            f"{(*tuple(hidden.shape[:-1]), ref_weight.shape[1])}"
        )
    vocab = weight.shape[0]
    if ref_weight.shape[0] != vocab:
        raise ValueError(
            f"ref_weight has {ref_weight.shape[0]} rows but weight has {vocab}; "
            "expected the same vocabulary"
        )
    for name, b in (("bias", bias), ("ref_bias", ref_bias)):
        if b is not None:
            check_float(name, b)
            if tuple(b.shape) != (vocab,):
                raise ValueError(f"{name} has shape {tuple(b.shape)}, expected ({vocab},)")
    check_choice("direction", direction, DIRECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_temperature(temperature)
    n = math.prod(hidden.shape[:-1])
    lead = tuple(hidden.shape[:-1])
    _check_mask("token_mask", token_mask, (lead, (n,)), f"{lead} or ({n},)")
    _check_mask("vocab_mask", vocab_mask, ((vocab,),), f"({vocab},)")
    _check_target(ref_labels, ref_label_shift, cross_entropy, direction, lead, vocab)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_same_device(
        hidden=hidden,
        weight=weight,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        bias=bias,
        ref_bias=ref_bias,
        token_mask=token_mask,
        vocab_mask=vocab_mask,
        ref_labels=ref_labels,
    )
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    ref_bias = None if ref_bias is None else ref_bias.detach()
    chosen = choose_backend(
        NAME,
        backend,
        hidden.device,
        float64_gap(hidden, weight, bias, ref_hidden, ref_weight, ref_bias),
    )
    if chosen == "reference":
        return ref.fused_linear_masked_kl(
            hidden,
            weight,
            ref_hidden,
            ref_weight,
            bias,
            ref_bias,
            token_mask,
            vocab_mask,
            direction,
            reduction,
            float(temperature),
            ref_labels=ref_labels,
            ref_label_shift=float(ref_label_shift),
            cross_entropy=cross_entropy,
        )
    chunk = chunk_size or default_chunk_size(n, vocab)
    grad_on = torch.is_grad_enabled()
    want = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return FusedLinearMaskedKLFunction.apply(
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        _float_mask(token_mask),
        _float_mask(vocab_mask),
        DIRECTION_ID[direction],
        1.0 / float(temperature),
        reduction,
        chosen,
        chunk,
        want,
        _labels1d(ref_labels),
        float(ref_label_shift),
        cross_entropy,
    )
