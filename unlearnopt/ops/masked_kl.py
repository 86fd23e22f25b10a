"""Fused masked KL divergence to the original model: SIU's dual masked KL, MOLLM's retain KL.

With z = logits / T, r = ref_logits / T, p = softmax(z) (model), q = softmax(r) (frozen
original), vocabulary mask u and token mask m, token t's loss is ``m_t * KL_t`` with

    forward: KL = sum_v u_v q_v (log q_v - log p_v)   dKL/dz_j = -u_j q_j + S p_j,  S = sum u q
    reverse: KL = sum_v u_v p_v (log p_v - log q_v)   dKL/dz_j = p_j (u_j (f_j + 1) - C),
             f = log p - log q,  C = KL + sum u p

(the reverse derivation is written next to the kernels' gradient loops). The masks multiply
the terms, the distributions are not renormalised (sum_v u_v q_v may be below 1). The gradient with respect
to the logits carries the 1/T of z = logits / T; the loss is not rescaled by T^2.

Passes over the logits, same deferred design as ``unlearning_cross_entropy``: the forward
reads both rows once (online log-sum-exp of each, masked sums rescaled as the running
maxima grow) and keeps per row only ``(lse_z, lse_r, coef)``; the backward reads both rows
once more and writes the gradient (into the logits buffer with ``inplace_backward``). No
``[N, V]`` probability tensor is ever built. When the upstream scale is known up front
(``fused_linear_masked_kl`` with ``mean``/``sum``), one launch gives loss and gradient.
"""

from __future__ import annotations

import math

import torch

from unlearnopt.ops._backend import choose_backend, float64_gap, kernel
from unlearnopt.ops._checks import check_choice, check_float, check_same_device
from unlearnopt.ops.unlearning_cross_entropy import reduce_rows, upstream_scale
from unlearnopt.reference import masked_kl as ref

DIRECTIONS = ref.DIRECTIONS
REDUCTIONS = ref.REDUCTIONS
DIRECTION_ID = {"forward": 0, "reverse": 1}
MASK_DTYPES = (torch.bool, torch.float32, torch.float16, torch.bfloat16, torch.float64,
               torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# Row kernel contract, the same for ``kernel("masked_kl", "triton"|"native")``:
# ``rows(logits [N, V], ref_logits [N, V] (same dtype, unit column stride, row strides free),
# token_mask [N] f32 | None, vocab_mask [V] f32 | None, direction_id (0 forward, 1 reverse),
# inv_temperature, stats_in [N, 3] f32 | None, grad_scale f32 (1 or N elements) | None,
# grad_out [N, V] | None) -> (loss [N] f32, stats [N, 3] f32)``; stats rows are
# ``(lse_z, lse_r, coef)``. With ``grad_scale`` it also writes
# ``grad_scale[i] * m_i * dKL_i/dlogits_i`` into ``grad_out`` (may be ``logits``). With
# ``stats_in`` (backward) the statistics pass is skipped and both outputs are empty.
OP = "masked_kl"


def token_mask_from_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Bool token mask of ``labels``' shape: False where ``labels == ignore_index``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    return labels != ignore_index


def vocab_mask_from_token_ids(token_ids, vocab_size: int,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Float32 ``[vocab_size]`` vocabulary mask: 0 at ``token_ids`` (the concept), 1 elsewhere."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=device).reshape(-1)
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= vocab_size).any())):
        raise ValueError(f"token_ids must lie in [0, {vocab_size}), got {ids.tolist()}")
    mask = torch.ones(vocab_size, dtype=torch.float32, device=ids.device)
    mask[ids] = 0.0
    return mask


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(float(temperature)) or float(temperature) <= 0.0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_mask(name: str, mask, allowed: tuple[tuple[int, ...], ...], what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype not in MASK_DTYPES:
        raise ValueError(f"{name} must be a bool, integer or floating tensor, "
                         f"got dtype {mask.dtype}")
    if tuple(mask.shape) not in allowed:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {what}")


def validate(logits, ref_logits, token_mask, vocab_mask, direction, reduction, temperature,
             logits_name: str = "logits", ref_name: str = "ref_logits") -> None:
    check_float(logits_name, logits)
    check_float(ref_name, ref_logits)
    if logits.dim() < 2:
        raise ValueError(f"{logits_name} must be [N, V] or [B, T, V], "
                         f"got shape {tuple(logits.shape)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"{ref_name} has shape {tuple(ref_logits.shape)} but {logits_name} has "
                         f"{tuple(logits.shape)}; expected the same shape")
    check_choice("direction", direction, DIRECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_temperature(temperature)
    vocab = logits.shape[-1]
    n = math.prod(logits.shape[:-1])
    lead = tuple(logits.shape[:-1])
    _check_mask("token_mask", token_mask, (lead, (n,)),
                f"{lead} or ({n},) (the {logits_name} shape without its last dim)")
    _check_mask("vocab_mask", vocab_mask, ((vocab,),), f"({vocab},) (the vocabulary size of "
                f"{logits_name})")
    check_same_device(**{logits_name: logits, ref_name: ref_logits, "token_mask": token_mask,
                         "vocab_mask": vocab_mask})


def _float_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.reshape(-1).to(torch.float32).contiguous()


def _token_count(tmask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Tokens that count for ``mean``, kept on the device (no ``.item()``)."""
    if tmask is None:
        return torch.tensor(float(n), device=device)
    return (tmask != 0).sum().to(torch.float32)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class MaskedKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, tmask, vmask, direction_id, inv_t, reduction, backend,
                inplace_backward):
        logits2d = _rows2d(logits)
        ref2d = _rows2d(ref_logits)
        loss_rows, stats = kernel(OP, backend)(logits2d, ref2d, tmask, vmask, direction_id,
                                                  inv_t, None, None, None)
        count = _token_count(tmask, logits2d.shape[0], logits.device)
        ctx.save_for_backward(logits2d, ref2d, tmask, vmask, stats, count)
        ctx.config = (direction_id, inv_t, reduction, backend, inplace_backward, logits.shape)
        out = reduce_rows(loss_rows, reduction, count)
        return out.reshape(logits.shape[:-1]) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_output):
        direction_id, inv_t, reduction, backend, inplace_backward, shape = ctx.config
        logits2d, ref2d, tmask, vmask, stats, count = ctx.saved_tensors
        grad = logits2d if inplace_backward else torch.empty_like(logits2d)
        scale = upstream_scale(grad_output, reduction, count)
        kernel(OP, backend)(logits2d, ref2d, tmask, vmask, direction_id, inv_t, stats, scale,
                               grad)
        return grad.view(shape), None, None, None, None, None, None, None, None


@torch.compiler.disable
def masked_kl(logits: torch.Tensor, ref_logits: torch.Tensor,
              token_mask: torch.Tensor | None = None, vocab_mask: torch.Tensor | None = None,
              direction: str = "forward", reduction: str = "mean", temperature: float = 1.0, *,
              inplace_backward: bool = False, backend: str | None = None) -> torch.Tensor:
    """Masked KL divergence between the model and the frozen original, fused.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]`` float32 / bfloat16 / float16 (math is float32;
            float64 runs the reference in float64). The model's logits; gets the gradient.
        ref_logits: same shape, the original model's logits. Treated as a constant: it is
            detached inside the op and never receives a gradient. A different float dtype
            is promoted with ``logits`` to their common dtype.
        token_mask: ``[N]`` or ``logits.shape[:-1]``, bool / integer / float, or None (all
            tokens). Multiplies each token's KL (SIU's m_t; e.g. ``token_mask_from_labels``).
        vocab_mask: ``[V]`` bool / integer / float, or None. Multiplies each vocabulary term
            (SIU's u_v; e.g. ``vocab_mask_from_token_ids``). Not renormalised.
        direction: ``"forward"``: KL(p_ref || p_θ) = sum_v u_v q_v (log q_v - log p_v) (SIU's
            DMK, the retain KL); ``"reverse"``: KL(p_θ || p_ref) =
            sum_v u_v p_v (log p_v - log q_v).
        reduction: ``"mean"``: ``sum_t m_t KL_t / #(m_t != 0)`` (for a bool mask the mean over
            kept tokens; for a float mask the weighted sum divided by the number of non-zero
            weights; 0 with zero gradient when every token is masked); ``"sum"``:
            ``sum_t m_t KL_t``; ``"none"``: float32 ``m_t KL_t`` of shape ``logits.shape[:-1]``.
        temperature: > 0; both logit sets are divided by it before the softmax. The loss is
            not multiplied by T^2.
        inplace_backward: write the gradient into the logits buffer during backward (extra
            memory O(N) instead of O(N·V)). Only when nothing else reads these logits after
            this loss's backward.
        backend: ``"auto"`` / ``"triton"`` / ``"native"`` / ``"reference"``; default from
            ``UNLEARNOPT_BACKEND``. float64 inputs run on the reference: ``auto`` takes it
            (one warning), a named kernel backend raises ``ValueError``.

    Returns:
        float32 loss. Plain-PyTorch equivalent (forward direction, T = 1)::

            lp = logits.float().log_softmax(-1); lq = ref_logits.float().log_softmax(-1)
            kl = (vocab_mask * lq.exp() * (lq - lp)).sum(-1)          # [..]
            loss = (token_mask * kl).sum() / (token_mask != 0).sum().clamp(min=1)

        With no masks, ``reduction="mean"`` and 2-D logits this is
        ``F.kl_div(lp, lq, log_target=True, reduction="batchmean")``.

    Example:
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> ref_logits = torch.randn(4, 10)
        >>> u = vocab_mask_from_token_ids([3, 7], 10)
        >>> m = token_mask_from_labels(torch.tensor([1, -100, 2, 5]))
        >>> masked_kl(logits, ref_logits, token_mask=m, vocab_mask=u).backward()
    """
    validate(logits, ref_logits, token_mask, vocab_mask, direction, reduction, temperature)
    ref_logits = ref_logits.detach()
    chosen = choose_backend(OP, backend, logits.device, float64_gap(logits, ref_logits))
    dtype = torch.promote_types(logits.dtype, ref_logits.dtype)
    if chosen == "reference":
        return ref.masked_kl(logits, ref_logits, token_mask, vocab_mask, direction, reduction,
                             float(temperature))
    return MaskedKLFunction.apply(logits.to(dtype), ref_logits.to(dtype), _float_mask(token_mask),
                                  _float_mask(vocab_mask), DIRECTION_ID[direction],
                                  1.0 / float(temperature), reduction, chosen, inplace_backward)


# ---------------------------------------------------------------------------------------------
# Fused linear: logits chunk by chunk, never the whole [N, V] of either model.

def default_chunk_size(n: int, vocab: int) -> int:
    """Tokens per chunk: ~4M logits (16 MB fp32) per model, whole batches when they are small."""
    return max(1, min(n, (1 << 22) // max(vocab, 1)))


def _linear_chunks(h2, weight, bias, rh2, ref_weight, ref_bias, tmask, vmask, direction_id,
                   inv_t, backend, chunk, scale, stats_in, want):
    """Loop over token chunks; with ``scale`` also the gradients of hidden / weight / bias.

    ``scale``: f32 ``[1]`` or ``[N]`` upstream factor (None: loss only). ``want``: which of
    (hidden, weight, bias) need a gradient. Returns (loss_rows | None, stats, gh, gw, gb).
    """
    n = h2.shape[0]
    device = h2.device
    rows = kernel(OP, backend)
    loss_rows = None if stats_in is not None else torch.empty(n, dtype=torch.float32, device=device)
    stats = stats_in if stats_in is not None else torch.empty(n, 3, dtype=torch.float32,
                                                              device=device)
    gh = torch.empty_like(h2) if (scale is not None and want[0]) else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=device) \
        if (scale is not None and want[1]) else None
    gb = torch.zeros(bias.shape, dtype=torch.float32, device=device) \
        if (scale is not None and want[2] and bias is not None) else None
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        logits = torch.nn.functional.linear(h2[lo:hi], weight, bias)
        ref_logits = torch.nn.functional.linear(rh2[lo:hi], ref_weight, ref_bias)
        dtype = torch.promote_types(logits.dtype, ref_logits.dtype)
        logits, ref_logits = logits.to(dtype), ref_logits.to(dtype)
        tm = None if tmask is None else tmask[lo:hi]
        if scale is None:
            lr, st = rows(logits, ref_logits, tm, vmask, direction_id, inv_t, None, None, None)
            loss_rows[lo:hi] = lr
            stats[lo:hi] = st
            continue
        sc = scale if scale.numel() == 1 else scale[lo:hi]
        st_in = None if stats_in is None else stats_in[lo:hi]
        # The gradient overwrites this chunk's logits: they are not needed afterwards.
        lr, st = rows(logits, ref_logits, tm, vmask, direction_id, inv_t, st_in, sc, logits)
        if stats_in is None:
            loss_rows[lo:hi] = lr
            stats[lo:hi] = st
        g = logits.to(weight.dtype)
        if gh is not None:
            gh[lo:hi] = g @ weight
        if gw is not None:
            gw.addmm_(g.t().float(), h2[lo:hi].float())
        if gb is not None:
            gb += g.float().sum(0)
    return loss_rows, stats, gh, gw, gb


class FusedLinearMaskedKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tmask, vmask,
                direction_id, inv_t, reduction, backend, chunk):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        rh2 = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        n = h2.shape[0]
        count = _token_count(tmask, n, hidden.device)
        want = tuple(ctx.needs_input_grad[:3])
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.config = (reduction, hidden.shape, direction_id, inv_t, backend, chunk, want)
        if reduction == "none" or not any(want):
            # Per-row upstream factors are unknown yet: keep the inputs, recompute in backward.
            loss_rows, stats, *_ = _linear_chunks(h2, weight, bias, rh2, ref_weight, ref_bias,
                                                  tmask, vmask, direction_id, inv_t, backend,
                                                  chunk, None, None, want)
            ctx.save_for_backward(h2, weight, bias, rh2, ref_weight, ref_bias, tmask, vmask,
                                  stats)
            ctx.deferred = True
        else:
            # mean / sum: the scale is known, so loss and gradients come from one pass.
            scale = (1.0 / count.clamp(min=1) if reduction == "mean"
                     else torch.ones((), device=hidden.device)).reshape(1).float()
            loss_rows, _, gh, gw, gb = _linear_chunks(h2, weight, bias, rh2, ref_weight, ref_bias,
                                                      tmask, vmask, direction_id, inv_t, backend,
                                                      chunk, scale, None, want)
            ctx.save_for_backward(gh, gw, gb)
            ctx.deferred = False
        out = reduce_rows(loss_rows, reduction, count)
        return out.reshape(hidden.shape[:-1]) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_output):
        reduction, hshape, direction_id, inv_t, backend, chunk, want = ctx.config
        if ctx.deferred:
            h2, weight, bias, rh2, ref_weight, ref_bias, tmask, vmask, stats = ctx.saved_tensors
            count = _token_count(tmask, h2.shape[0], h2.device)
            scale = upstream_scale(grad_output, reduction, count)
            _, _, gh, gw, gb = _linear_chunks(h2, weight, bias, rh2, ref_weight, ref_bias, tmask,
                                              vmask, direction_id, inv_t, backend, chunk, scale,
                                              stats, want)
        else:
            gh, gw, gb = ctx.saved_tensors
            g = grad_output.float()
            gh = None if gh is None else (gh * g).to(gh.dtype)
            gw = None if gw is None else gw * g
            gb = None if gb is None else gb * g
        wdt, bdt = ctx.dtypes
        gh = None if gh is None else gh.view(hshape)
        gw = None if gw is None else gw.to(wdt)
        gb = None if gb is None else gb.to(bdt)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None, None


@torch.compiler.disable
def fused_linear_masked_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                           ref_weight: torch.Tensor, bias: torch.Tensor | None = None,
                           ref_bias: torch.Tensor | None = None,
                           token_mask: torch.Tensor | None = None,
                           vocab_mask: torch.Tensor | None = None, direction: str = "forward",
                           reduction: str = "mean", temperature: float = 1.0,
                           chunk_size: int | None = None, *,
                           backend: str | None = None) -> torch.Tensor:
    """Masked KL of ``hidden @ weight.T + bias`` against the original model's
    ``ref_hidden @ ref_weight.T + ref_bias``, without holding either ``[N, V]`` logits whole.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` float (the model's last hidden states).
        weight: ``[V, H]`` lm_head weight; bias: ``[V]`` or None.
        ref_hidden: ``[..., H_ref]`` with the same leading shape as ``hidden``; ref_weight
            ``[V, H_ref]``; ref_bias ``[V]`` or None. Constants: no gradient reaches them.
        token_mask, vocab_mask, direction, reduction, temperature: as in :func:`masked_kl`.
        chunk_size: tokens per chunk (default ~4M logits per chunk, see
            ``default_chunk_size``); peak extra memory ~3 chunks of logits.

    Returns:
        float32 loss; gradients for ``hidden``, ``weight`` and ``bias``. With ``mean``/``sum``
        they are computed during the forward (one pass, logits chunks overwritten by their
        gradient); with ``none`` the backward recomputes the chunks. Equivalent:
        ``masked_kl(F.linear(hidden, weight, bias), F.linear(ref_hidden, ref_weight,
        ref_bias).detach(), ...)``.

    Example:
        >>> h = torch.randn(6, 8, requires_grad=True); w = torch.randn(50, 8, requires_grad=True)
        >>> fused_linear_masked_kl(h, w, h.detach(), w.detach() + 0.1).backward()
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden),
                    ("ref_weight", ref_weight)):
        check_float(name, t)
    if weight.dim() != 2 or ref_weight.dim() != 2:
        raise ValueError(f"weight and ref_weight must be [V, H], got {tuple(weight.shape)} and "
                         f"{tuple(ref_weight.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}; expected [..., "
                         f"{weight.shape[1]}] (weight is {tuple(weight.shape)})")
    if ref_hidden.shape[:-1] != hidden.shape[:-1] or ref_hidden.shape[-1] != ref_weight.shape[1]:
        raise ValueError(f"ref_hidden has shape {tuple(ref_hidden.shape)}; expected "
                         f"{tuple(hidden.shape[:-1]) + (ref_weight.shape[1],)}")
    vocab = weight.shape[0]
    if ref_weight.shape[0] != vocab:
        raise ValueError(f"ref_weight has {ref_weight.shape[0]} rows but weight has {vocab}; "
                         "expected the same vocabulary")
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
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_same_device(hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      bias=bias, ref_bias=ref_bias, token_mask=token_mask, vocab_mask=vocab_mask)
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    ref_bias = None if ref_bias is None else ref_bias.detach()
    chosen = choose_backend("fused_linear_masked_kl", backend, hidden.device,
                            float64_gap(hidden, weight, bias, ref_hidden, ref_weight, ref_bias))
    if chosen == "reference":
        return ref.fused_linear_masked_kl(hidden, weight, ref_hidden, ref_weight, bias, ref_bias,
                                          token_mask, vocab_mask, direction, reduction,
                                          float(temperature))
    chunk = chunk_size or default_chunk_size(n, vocab)
    return FusedLinearMaskedKLFunction.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                   _float_mask(token_mask), _float_mask(vocab_mask),
                                   DIRECTION_ID[direction], 1.0 / float(temperature), reduction,
                                   chosen, chunk)

