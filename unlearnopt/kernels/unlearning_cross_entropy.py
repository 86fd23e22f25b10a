"""Triton row kernel of the fused unlearning cross-entropy (``nll`` / ``ga`` / ``uce``).

One program per row. Pass 1 streams the row in ``BLOCK_V`` chunks with an online
log-sum-exp (running max ``m`` and a sum ``s`` rescaled by ``exp(m_old - m_new)`` whenever
the max grows), all in float32, and keeps only ``lse`` per row. Pass 2 (when a gradient
scale is given) streams the row again and writes the gradient. The forward of the op runs
pass 1; its backward runs pass 2 with the saved ``lse``; a caller that knows the upstream
scale up front (fused linear CE) gets loss and gradient from ONE launch (pass 1 then pass 2
over the same row; for short rows the second read can come from L2).

Imported lazily (``import triton`` happens here only), see ``unlearnopt.kernels``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearnopt.kernels._launch import check_gradient_args, device_guard, row_launch_settings

MODE_NLL, MODE_GA, MODE_UCE = 0, 1, 2


@triton.heuristics({
    # Every chunk is full: loads and stores drop their masks.
    "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0,
    # Backward / fused call: lse comes from the forward, skip pass 1.
    "HAS_LSE_IN": lambda args: args["lse_in_ptr"] is not None,
    "HAS_GRAD": lambda args: args["scale_ptr"] is not None,
})
@triton.jit
def _unlearning_ce_rows_kernel(
    logits_ptr, logits_row_stride,
    labels_ptr,
    loss_ptr, lse_ptr,
    lse_in_ptr,
    scale_ptr, scale_stride,
    grad_ptr, grad_row_stride,
    V, alpha, ignore_index,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EVEN_V: tl.constexpr,
    HAS_LSE_IN: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    # int64 before multiplying by the stride: row * stride passes 2^31 on big batches.
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    y = tl.load(labels_ptr + row)
    keep = y != ignore_index
    y_safe = tl.where(keep, y, 0)
    # Read before pass 2: with grad_ptr == logits_ptr the row is overwritten there.
    z_y = tl.load(z_row + y_safe).to(tl.float32)

    if HAS_LSE_IN:
        lse = tl.load(lse_in_ptr + row)
    else:
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            if EVEN_V:
                z = tl.load(z_row + cols).to(tl.float32)
            else:
                z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(lse_ptr + row, lse)

    log_p_y = z_y - lse
    p_y = tl.exp(log_p_y)
    if MODE == 0:
        loss = -log_p_y
    elif MODE == 1:
        loss = log_p_y
    else:
        # -log1p(-a p_y) without libdevice: with u = 1 - a p_y rounded, log(u) * x / (u - 1)
        # (x = -a p_y) cancels the rounding of u (Goldberg), so small a p_y keep full precision.
        x = -alpha * p_y
        u = 1.0 + x
        safe_den = tl.where(u == 1.0, 1.0, u - 1.0)
        loss = -tl.where(u == 1.0, x, tl.log(u) * (x / safe_den))
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))

    if HAS_GRAD:
        # d loss / d z_j = c (p_j - [j == y]) with c = 1 (nll), -1 (ga),
        # -(a p_y) / (1 - a p_y) (uce: d/dz_j of -log(1 - a p_y) = -a p_y (e_y - p)_j / (1 - a p_y)).
        if MODE == 0:
            c = 1.0
        elif MODE == 1:
            c = -1.0
        else:
            c = -(alpha * p_y) / (1.0 - alpha * p_y)
        scale = tl.load(scale_ptr + row * scale_stride)
        coef = tl.where(keep, scale * c, 0.0)
        g_row = grad_ptr + row * grad_row_stride
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            if EVEN_V:
                z = tl.load(z_row + cols).to(tl.float32)
            else:
                z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            # The true-class term p_y - 1 is formed in fp32 and stored once: correcting a
            # bf16-rounded p_y afterwards would lose most of its digits near p_y = 1.
            g = (coef * tl.where(cols == y, p - 1.0, p)).to(grad_ptr.dtype.element_ty)
            if EVEN_V:
                tl.store(g_row + cols, g)
            else:
                tl.store(g_row + cols, g, mask=cols < V)


def _check_rows(name: str, t: torch.Tensor, n: int, dtype: torch.dtype,
                device: torch.device) -> None:
    if t.dtype != dtype or t.dim() != 1 or t.shape[0] != n or t.device != device:
        raise ValueError(f"{name} must be a [{n}] {dtype} tensor on {device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def unlearning_cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: int,
    alpha: float,
    ignore_index: int,
    lse_in: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp, and optionally the gradient, in one launch.

    Args:
        logits: ``[N, V]`` float32 / bfloat16 / float16, unit column stride, any row stride.
        labels: ``[N]`` int64, in ``[0, V)`` or ``ignore_index`` (not range-checked here).
        mode: 0 = nll (``lse - z_y``), 1 = ga (``z_y - lse``), 2 = uce
            (``-log1p(-alpha * exp(z_y - lse))``).
        alpha: the uce parameter (unused by the other modes).
        ignore_index: rows with this label get loss 0 and gradient 0.
        lse_in: ``[N]`` float32 log-sum-exp from an earlier call; skips the reduction pass and
            is returned as ``lse``.
        grad_scale: float32 with 1 (broadcast) or N elements. When given, writes
            ``grad_out[i] = grad_scale[i] * c_i * (softmax(logits[i]) - onehot(y_i))``, with
            ``c = 1, -1, -alpha p_y / (1 - alpha p_y)`` for nll, ga, uce.
        grad_out: ``[N, V]``, unit column stride; required with ``grad_scale``. May be
            ``logits`` itself: the gradient then overwrites the logits in place.

    Returns:
        ``(loss [N] float32, lse [N] float32)``; loss is 0 at ignored rows.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [N, V] with unit column stride, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
    if mode not in (MODE_NLL, MODE_GA, MODE_UCE):
        raise ValueError(f"mode must be 0 (nll), 1 (ga) or 2 (uce), got {mode!r}")
    n, vocab = logits.shape
    device = logits.device
    _check_rows("labels", labels, n, torch.int64, device)
    labels = labels.contiguous()
    if lse_in is not None:
        _check_rows("lse_in", lse_in, n, torch.float32, device)
        lse_in = lse_in.contiguous()
    grad_scale, scale_stride = check_gradient_args(logits, grad_scale, grad_out)

    loss = torch.empty(n, dtype=torch.float32, device=device)
    lse = lse_in if lse_in is not None else torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return loss, lse

    block_v, num_warps = row_launch_settings(vocab, logits.dtype, rows_per_chunk=1)
    with device_guard(device):
        _unlearning_ce_rows_kernel[(n,)](
            logits, logits.stride(0),
            labels,
            loss, lse,
            lse_in,
            grad_scale, scale_stride,
            grad_out, grad_out.stride(0) if grad_out is not None else 0,
            vocab, float(alpha), int(ignore_index),
            MODE=mode,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return loss, lse
