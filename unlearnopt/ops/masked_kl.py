"""Fused masked KL divergence to the original model: SIU's dual masked KL, MOLLM's retain KL.

With z = logits / T, r = ref_logits / T, p = softmax(z) (model), q = softmax(r) (frozen
original), vocabulary mask u and token mask m, token t's loss is ``m_t * KL_t`` with

    forward: KL = sum_v u_v q_v (log q_v - log p_v)   dKL/dz_j = -u_j q_j + S p_j,  S = sum u q
    reverse: KL = sum_v u_v p_v (log p_v - log q_v)   dKL/dz_j = p_j (u_j (f_j + 1) - C),
             f = log p - log q,  C = KL + sum u p

(the reverse derivation is written next to the kernels' gradient loops). The masks multiply
the terms, the distributions are not renormalised (sum_v u_v q_v may be below 1). The
gradient with respect
to the logits carries the 1/T of z = logits / T; the loss is not rescaled by T^2.

Label-lowered target (``ref_labels`` y, ``ref_label_shift`` gamma; UNDIAL's adjusted logits,
Dong et al., 2024, arXiv 2402.10052): the reference row is r - gamma e_y before the
temperature, so q = softmax((ref_logits - gamma e_y) / T). ``cross_entropy=True`` (forward
only) reports ``CE = -sum_v u_v q_v log p_v = KL + H_u(q)``, ``H_u(q) = -sum_v u_v q_v log q_v``
(the target's entropy, over the vocabulary mask); H_u does not depend on the logits, so the
gradient is the KL's. It takes one more statistics pass over the reference row, against a
uniform row (z = 0, log p = -log V): ``KL_u(q || uniform) = S log V - H_u(q)``, S = sum u q.

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
from unlearnopt.ops._checks import (
    LABEL_DTYPES,
    check_choice,
    check_float,
    check_same_device,
    eager_label_check,
)
from unlearnopt.ops.unlearning_cross_entropy import reduce_rows, upstream_scale
from unlearnopt.reference import masked_kl as ref

DIRECTIONS = ref.DIRECTIONS
REDUCTIONS = ref.REDUCTIONS
IGNORE_INDEX = ref.IGNORE_INDEX
DIRECTION_ID = {"forward": 0, "reverse": 1}
MASK_DTYPES = (
    torch.bool,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
)


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


def vocab_mask_from_token_ids(
    token_ids, vocab_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
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
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(float(temperature))
        or float(temperature) <= 0.0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_mask(name: str, mask, allowed: tuple[tuple[int, ...], ...], what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype not in MASK_DTYPES:
        raise ValueError(
            f"{name} must be a bool, integer or floating tensor, got dtype {mask.dtype}"
        )
    if tuple(mask.shape) not in allowed:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {what}")


def _check_target(
    ref_labels, ref_label_shift, cross_entropy, direction, lead: tuple[int, ...], vocab: int
) -> None:
    """The label-lowered target's options (``ref_labels`` ``lead`` or ``[N]``, values in
    ``[0, vocab)`` or ``IGNORE_INDEX``; the range is read as ``check_labels`` reads it)."""
    if not isinstance(cross_entropy, bool):
        raise TypeError(f"cross_entropy must be a bool, got {type(cross_entropy).__name__}")
    if cross_entropy and direction != "forward":
        raise ValueError(
            f"cross_entropy=True needs direction='forward' (the cross-entropy of the model "
            f"against the reference), got direction={direction!r}"
        )
    if (
        isinstance(ref_label_shift, bool)
        or not isinstance(ref_label_shift, (int, float))
        or not math.isfinite(float(ref_label_shift))
    ):
        raise ValueError(f"ref_label_shift must be a finite number, got {ref_label_shift!r}")
    if ref_labels is None:
        if float(ref_label_shift) != 0.0:
            raise ValueError(
                "ref_label_shift is set but ref_labels is None; pass the labels whose "
                "reference logits are lowered"
            )
        return
    if not isinstance(ref_labels, torch.Tensor):
        raise TypeError(
            f"ref_labels must be a torch.Tensor or None, got {type(ref_labels).__name__}"
        )
    if ref_labels.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"ref_labels must be an int64 or int32 tensor, got dtype {ref_labels.dtype}"
        )
    n = math.prod(lead)
    if tuple(ref_labels.shape) not in (lead, (n,)):
        raise ValueError(
            f"ref_labels has shape {tuple(ref_labels.shape)}, expected {lead} or ({n},) "
            "(one label per token)"
        )
    if ref_labels.numel() and eager_label_check(ref_labels):
        bad = (ref_labels != IGNORE_INDEX) & ((ref_labels < 0) | (ref_labels >= vocab))
        if bool(bad.any()):
            raise ValueError(
                f"ref_labels must lie in [0, {vocab}) or equal {IGNORE_INDEX}; "
                f"found {int(ref_labels[bad][0])}"
            )


def validate(
    logits,
    ref_logits,
    token_mask,
    vocab_mask,
    direction,
    reduction,
    temperature,
    logits_name: str = "logits",
    ref_name: str = "ref_logits",
    ref_labels=None,
    ref_label_shift=0.0,
    cross_entropy=False,
) -> None:
    check_float(logits_name, logits)
    check_float(ref_name, ref_logits)
    if logits.dim() < 2:
        raise ValueError(
            f"{logits_name} must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}"
        )
    if ref_logits.shape != logits.shape:
        raise ValueError(
            f"{ref_name} has shape {tuple(ref_logits.shape)} but {logits_name} has "
            f"{tuple(logits.shape)}; expected the same shape"
        )
    check_choice("direction", direction, DIRECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_temperature(temperature)
    vocab = logits.shape[-1]
    n = math.prod(logits.shape[:-1])
    lead = tuple(logits.shape[:-1])
    _check_mask(
        "token_mask",
        token_mask,
        (lead, (n,)),
        f"{lead} or ({n},) (the {logits_name} shape without its last dim)",
    )
    _check_mask(
        "vocab_mask", vocab_mask, ((vocab,),), f"({vocab},) (the vocabulary size of {logits_name})"
    )
    _check_target(ref_labels, ref_label_shift, cross_entropy, direction, lead, vocab)
    check_same_device(
        **{
            logits_name: logits,
            ref_name: ref_logits,
            "token_mask": token_mask,
            "vocab_mask": vocab_mask,
            "ref_labels": ref_labels,
        }
    )


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


def _labels1d(labels: torch.Tensor | None) -> torch.Tensor | None:
    return None if labels is None else labels.reshape(-1).long()


def _lowered(ref2d: torch.Tensor, labels: torch.Tensor | None, shift: float) -> torch.Tensor:
    """``ref2d`` itself, or a copy with each row's label logit lowered by ``shift``."""
    if labels is None:
        return ref2d
    return ref.lower_label_logits_(
        ref2d.clone(memory_format=torch.contiguous_format), labels, shift
    )


def _entropy_rows(rows, ref2d, tmask, vmask, inv_t) -> torch.Tensor:
    """``m_i * H_u(q_i) = -m_i sum_v u_v q_v log q_v`` per row, ``[N]`` float32
    (q_i = softmax(ref2d_i / T)).

    One statistics pass of the row kernel with the model row replaced by a uniform one
    (zeros, broadcast with row stride 0: nothing ``[N, V]`` is allocated). Against it,
    log p_v = -log V, so the kernel's KL is ``S log V - H_u(q)`` with its stats
    ``lse_z = log V`` and ``coef = S = sum u q``.
    """
    uniform = ref2d.new_zeros(1, ref2d.shape[1]).expand(ref2d.shape[0], -1)
    kl_uniform, stats = rows(
        uniform, ref2d, tmask, vmask, DIRECTION_ID["forward"], inv_t, None, None, None
    )
    log_v_mass = stats[:, 0] * stats[:, 2]
    if tmask is not None:
        # where, not a product: a masked row's statistics may hold anything (NaN logits).
        log_v_mass = torch.where(tmask != 0, tmask * log_v_mass, 0.0)
    return log_v_mass - kl_uniform


class MaskedKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits,
        ref_logits,
        tmask,
        vmask,
        direction_id,
        inv_t,
        reduction,
        backend,
        inplace_backward,
        ref_labels,
        shift,
        cross_entropy,
    ):
        logits2d = _rows2d(logits)
        ref2d = _rows2d(ref_logits)
        # The lowered copy lives only during this pass (and again during the backward).
        target = _lowered(ref2d, ref_labels, shift)
        rows = kernel(OP, backend)
        loss_rows, stats = rows(
            logits2d, target, tmask, vmask, direction_id, inv_t, None, None, None
        )
        if cross_entropy:
            loss_rows = loss_rows + _entropy_rows(rows, target, tmask, vmask, inv_t)
        del target
        count = _token_count(tmask, logits2d.shape[0], logits.device)
        ctx.save_for_backward(logits2d, ref2d, tmask, vmask, stats, count, ref_labels)
        ctx.config = (
            direction_id,
            inv_t,
            reduction,
            backend,
            inplace_backward,
            logits.shape,
            shift,
        )
        out = reduce_rows(loss_rows, reduction, count)
        return out.reshape(logits.shape[:-1]) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_output):
        direction_id, inv_t, reduction, backend, inplace_backward, shape, shift = ctx.config
        logits2d, ref2d, tmask, vmask, stats, count, ref_labels = ctx.saved_tensors
        grad = logits2d if inplace_backward else torch.empty_like(logits2d)
        scale = upstream_scale(grad_output, reduction, count)
        target = _lowered(ref2d, ref_labels, shift)
        kernel(OP, backend)(logits2d, target, tmask, vmask, direction_id, inv_t, stats, scale, grad)
        return (grad.view(shape),) + (None,) * 11


@torch.compiler.disable
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
    inplace_backward: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
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
        ref_labels: ``[N]`` or ``logits.shape[:-1]`` int64 / int32 in ``[0, V)`` or -100, or
            None. With it, each token's reference logit at its label is lowered by
            ``ref_label_shift`` before the temperature and the softmax (UNDIAL's adjusted
            target ``q = softmax(ref_logits - gamma e_y)``); -100 lowers nothing. The
            range is read on the host for CPU tensors only (as for ``unlearning_cross_entropy``);
            elsewhere an out-of-range label gives that token a NaN loss and gradient.
            The logits path lowers a copy of the reference rows (made in the forward and
            again in the backward, not kept in between).
        ref_label_shift: finite number, how far the label logit is lowered (gamma); must be 0
            without ``ref_labels``.
        cross_entropy: report ``CE_t = -sum_v u_v q_v log p_v = KL_t + H_u(q_t)`` instead of
            ``KL_t`` (forward direction only; ``H_u(q) = -sum_v u_v q_v log q_v``, the target's
            entropy): UNDIAL's loss value. H_u is a constant of the reference, so the
            gradient is the KL's; it costs one more statistics pass over the reference row.
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

        UNDIAL's loss, the cross-entropy against the reference with each label logit
        lowered by gamma = 10 (plain PyTorch: ``r = ref_logits.clone(); r[i, y_i] -= 10;
        -(r.softmax(-1) * logits.log_softmax(-1)).sum(-1)``, mean over the labelled rows):

        >>> y = torch.tensor([1, -100, 2, 5])
        >>> loss = masked_kl(logits, ref_logits, token_mask=y != -100, ref_labels=y,
        ...                  ref_label_shift=10.0, cross_entropy=True)
    """
    validate(
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
    ref_logits = ref_logits.detach()
    chosen = choose_backend(OP, backend, logits.device, float64_gap(logits, ref_logits))
    dtype = torch.promote_types(logits.dtype, ref_logits.dtype)
    if chosen == "reference":
        return ref.masked_kl(
            logits,
            ref_logits,
            token_mask,
            vocab_mask,
            direction,
            reduction,
            float(temperature),
            ref_labels=ref_labels,
            ref_label_shift=float(ref_label_shift),
            cross_entropy=cross_entropy,
        )
    return MaskedKLFunction.apply(
        logits.to(dtype),
        ref_logits.to(dtype),
        _float_mask(token_mask),
        _float_mask(vocab_mask),
        DIRECTION_ID[direction],
        1.0 / float(temperature),
        reduction,
        chosen,
        inplace_backward,
        _labels1d(ref_labels),
        float(ref_label_shift),
        cross_entropy,
    )
