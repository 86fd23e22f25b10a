"""Triton row kernel of the fused masked KL divergence (forward / reverse, token and vocab masks).

One program per row. Pass 1 streams BOTH rows (model logits z and reference logits r, both
divided by the temperature) in ``BLOCK_V`` chunks with an online log-sum-exp of each and the
masked sums, all rescaled by ``exp(m_old - m_new)`` whenever a running max grows, in
float32; it keeps per row only ``(lse_z, lse_r, coef)``. Pass 2 (when a gradient scale is
given) streams both rows again and writes the gradient. The op's forward runs pass 1, its
backward pass 2 with the saved statistics; a caller that knows the upstream scale
(fused linear) gets loss and gradient from one launch.

Imported lazily (``import triton`` happens here only), see ``unlearnopt.kernels``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearnopt.kernels._launch import check_gradient_args, device_guard, row_launch_settings

FORWARD, REVERSE = 0, 1


@triton.heuristics(
    {
        "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0,
        "HAS_TMASK": lambda args: args["tmask_ptr"] is not None,
        "HAS_VMASK": lambda args: args["vmask_ptr"] is not None,
        "HAS_STATS_IN": lambda args: args["stats_in_ptr"] is not None,
        "HAS_GRAD": lambda args: args["scale_ptr"] is not None,
    }
)
@triton.jit
def _masked_kl_rows_kernel(
    z_ptr,
    z_row_stride,
    r_ptr,
    r_row_stride,
    tmask_ptr,
    vmask_ptr,
    loss_ptr,
    stats_ptr,
    stats_in_ptr,
    scale_ptr,
    scale_stride,
    grad_ptr,
    grad_row_stride,
    V,
    inv_t,
    DIRECTION: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EVEN_V: tl.constexpr,
    HAS_TMASK: tl.constexpr,
    HAS_VMASK: tl.constexpr,
    HAS_STATS_IN: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    # int64 before multiplying by the stride: row * stride passes 2^31 on big batches.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    r_row = r_ptr + row * r_row_stride
    if HAS_TMASK:
        m = tl.load(tmask_ptr + row)
    else:
        m = 1.0

    if HAS_STATS_IN:
        lse_z = tl.load(stats_in_ptr + row * 3)
        lse_r = tl.load(stats_in_ptr + row * 3 + 1)
        coef = tl.load(stats_in_ptr + row * 3 + 2)
    else:
        mz = tl.full((), float("-inf"), tl.float32)
        mr = tl.full((), float("-inf"), tl.float32)
        sz = tl.zeros((), tl.float32)
        sr = tl.zeros((), tl.float32)
        a = tl.zeros((), tl.float32)
        b = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            if EVEN_V:
                z = tl.load(z_row + cols).to(tl.float32) * inv_t
                r = tl.load(r_row + cols).to(tl.float32) * inv_t
                z_x = z
                r_x = r
            else:
                # Padding is 0 for the differences and -inf (weight 0) for the exponentials.
                z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32) * inv_t
                r = tl.load(r_row + cols, mask=cols < V, other=0.0).to(tl.float32) * inv_t
                z_x = tl.where(cols < V, z, float("-inf"))
                r_x = tl.where(cols < V, r, float("-inf"))
            nmz = tl.maximum(mz, tl.max(z_x, axis=0))
            nmr = tl.maximum(mr, tl.max(r_x, axis=0))
            # 1 when the max did not move (also when both are still -inf: no NaN).
            cz = tl.where(mz == nmz, 1.0, tl.exp(mz - nmz))
            cr = tl.where(mr == nmr, 1.0, tl.exp(mr - nmr))
            ez = tl.exp(z_x - nmz)
            er = tl.exp(r_x - nmr)
            sz = sz * cz + tl.sum(ez, axis=0)
            sr = sr * cr + tl.sum(er, axis=0)
            # forward: a = sum u e^{r-mr}, b = sum u e^{r-mr} (r - z)
            # reverse: a = sum u e^{z-mz}, b = sum u e^{z-mz} (z - r)
            if DIRECTION == 0:
                w = er
                diff = r - z
                c = cr
            else:
                w = ez
                diff = z - r
                c = cz
            if HAS_VMASK:
                if EVEN_V:
                    u = tl.load(vmask_ptr + cols)
                else:
                    u = tl.load(vmask_ptr + cols, mask=cols < V, other=0.0)
                w = w * u
            # w == 0: a -inf logit (weight 0) must add 0, not 0 * inf = NaN.
            a = a * c + tl.sum(w, axis=0)
            b = b * c + tl.sum(tl.where(w == 0.0, 0.0, w * diff), axis=0)
            mz = nmz
            mr = nmr
        lse_z = mz + tl.log(sz)
        lse_r = mr + tl.log(sr)
        # log q - log p = (r - z) + (lse_z - lse_r)
        if DIRECTION == 0:
            s_mass = a / sr
            kl = b / sr + (lse_z - lse_r) * s_mass
            coef = s_mass
        else:
            s_mass = a / sz
            kl = b / sz + (lse_r - lse_z) * s_mass
            coef = kl + s_mass
        tl.store(stats_ptr + row * 3, lse_z)
        tl.store(stats_ptr + row * 3 + 1, lse_r)
        tl.store(stats_ptr + row * 3 + 2, coef)
        tl.store(loss_ptr + row, tl.where(m != 0.0, m * kl, 0.0))

    if HAS_GRAD:
        # Gradient w.r.t. the logits = k * dKL/dz with k = scale * m / T.
        #   forward: dKL/dz_j = -u_j q_j + S p_j                       (S = sum u q)
        #   reverse: f = log p - log q, dp_v/dz_j = p_v (d_vj - p_j), df_v/dz_j = d_vj - p_j:
        #            dKL/dz_j = sum_v u_v [p_v (d_vj - p_j) f_v + p_v (d_vj - p_j)]
        #                     = p_j (u_j (f_j + 1) - C),  C = KL + sum u p
        scale = tl.load(scale_ptr + row * scale_stride)
        k = tl.where(m != 0.0, scale * m * inv_t, 0.0)
        g_row = grad_ptr + row * grad_row_stride
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            if EVEN_V:
                z = tl.load(z_row + cols).to(tl.float32) * inv_t
                r = tl.load(r_row + cols).to(tl.float32) * inv_t
            else:
                z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32) * inv_t
                r = tl.load(r_row + cols, mask=cols < V, other=0.0).to(tl.float32) * inv_t
            if HAS_VMASK:
                if EVEN_V:
                    u = tl.load(vmask_ptr + cols)
                else:
                    u = tl.load(vmask_ptr + cols, mask=cols < V, other=0.0)
            else:
                u = 1.0
            p = tl.exp(z - lse_z)
            if DIRECTION == 0:
                g = coef * p - u * tl.exp(r - lse_r)
            else:
                f = (z - lse_z) - (r - lse_r)
                g = tl.where(p == 0.0, 0.0, p * (u * (f + 1.0) - coef))
            g = tl.where(m != 0.0, k * g, 0.0).to(grad_ptr.dtype.element_ty)
            if EVEN_V:
                tl.store(g_row + cols, g)
            else:
                tl.store(g_row + cols, g, mask=cols < V)


def _check_vector(name: str, t: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if t.dtype != torch.float32 or t.dim() != 1 or t.shape[0] != n or t.device != device:
        raise ValueError(
            f"{name} must be a [{n}] float32 tensor on {device}, got "
            f"{tuple(t.shape)} {t.dtype} on {t.device}"
        )
    return t.contiguous()


def masked_kl_rows(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    token_mask: torch.Tensor | None,
    vocab_mask: torch.Tensor | None,
    direction: int,
    inv_temperature: float,
    stats_in: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row masked KL and its statistics, and optionally the gradient, in one launch.

    Args:
        logits, ref_logits: ``[N, V]`` float32 / bfloat16 / float16 of the same dtype, unit
            column stride, any row stride.
        token_mask: ``[N]`` float32 or None; row i's loss and gradient are multiplied by it.
        vocab_mask: ``[V]`` float32 or None; multiplies every vocabulary term.
        direction: 0 = forward KL(q || p), 1 = reverse KL(p || q).
        inv_temperature: 1 / T (> 0); both rows are multiplied by it before the softmax.
        stats_in: ``[N, 3]`` float32 ``(lse_z, lse_r, coef)`` from an earlier call; skips
            pass 1. Both returned tensors are then empty.
        grad_scale: float32 with 1 (broadcast) or N elements; when given, writes
            ``grad_scale[i] * token_mask[i] * dKL_i/dlogits_i`` into ``grad_out``.
        grad_out: ``[N, V]`` of logits' dtype, unit column stride; may be ``logits`` itself
            (the gradient then overwrites the logits in place).

    Returns:
        ``(loss [N] float32 (= m_i KL_i, 0 where m_i == 0), stats [N, 3] float32)``.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be [N, V] with unit column stride, got shape "
            f"{tuple(logits.shape)} strides {logits.stride()}"
        )
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
    if (
        ref_logits.shape != logits.shape
        or ref_logits.dtype != logits.dtype
        or ref_logits.stride(1) != 1
        or ref_logits.device != logits.device
    ):
        raise ValueError(
            f"ref_logits must match logits ({tuple(logits.shape)} {logits.dtype}, "
            f"unit column stride), got {tuple(ref_logits.shape)} {ref_logits.dtype} "
            f"strides {ref_logits.stride()}"
        )
    if direction not in (FORWARD, REVERSE):
        raise ValueError(f"direction must be 0 (forward) or 1 (reverse), got {direction!r}")
    if not inv_temperature > 0:
        raise ValueError(f"inv_temperature must be > 0, got {inv_temperature!r}")
    n, vocab = logits.shape
    device = logits.device
    if token_mask is not None:
        token_mask = _check_vector("token_mask", token_mask, n, device)
    if vocab_mask is not None:
        vocab_mask = _check_vector("vocab_mask", vocab_mask, vocab, device)
    empty = torch.empty(0, dtype=torch.float32, device=device)
    if stats_in is not None:
        if (
            stats_in.dtype != torch.float32
            or tuple(stats_in.shape) != (n, 3)
            or stats_in.device != device
        ):
            raise ValueError(
                f"stats_in must be a [{n}, 3] float32 tensor on {device}, got "
                f"{tuple(stats_in.shape)} {stats_in.dtype}"
            )
        if grad_scale is None:
            raise ValueError("stats_in without grad_scale does nothing")
        stats_in = stats_in.contiguous()
        loss, stats = empty, empty.reshape(0, 3)
    else:
        loss = torch.empty(n, dtype=torch.float32, device=device)
        stats = torch.empty(n, 3, dtype=torch.float32, device=device)
    grad_scale, scale_stride = check_gradient_args(logits, grad_scale, grad_out)
    if n == 0 or vocab == 0:
        return loss, stats

    block_v, num_warps = row_launch_settings(vocab, logits.dtype, rows_per_chunk=2)
    with device_guard(device):
        _masked_kl_rows_kernel[(n,)](
            logits,
            logits.stride(0),
            ref_logits,
            ref_logits.stride(0),
            token_mask,
            vocab_mask,
            loss,
            stats,
            stats_in,
            grad_scale,
            scale_stride,
            grad_out,
            grad_out.stride(0) if grad_out is not None else 0,
            vocab,
            float(inv_temperature),
            DIRECTION=direction,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return loss, stats
