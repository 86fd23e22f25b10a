"""Triton row kernel of the fused unlearning cross-entropy (``nll`` / ``ga`` / ``uce`` /
``wga`` / ``satimp`` / ``ce_u``; formulas in ``unlearnopt.ops.unlearning_cross_entropy``).

One program per row. Pass 1 streams the row in ``BLOCK_V`` chunks with an online sum of
exp over every column but the label's (running max ``m``, sum ``s`` rescaled by
``exp(m_old - m_new)`` whenever the max grows), in float32, then forms per row, in
float64, ``lse = m + log(s + exp(z_y - m))`` and ``q = 1 - p_y = s / (s + exp(z_y - m))``:
the sum over the other classes keeps 1 - p_y free of cancellation near p_y = 1, and with
it the nll loss ``-log1p(-q)``, the uce and ce_u coefficients, satimp's weight and the
label's gradient entry. For ``ce_u`` pass 1 also sums ``u = exp(z - m) (z - m)`` over the
other classes (rescaled with the max like s), which gives the entropy h = log s - u / s of
softmax over them, and ce_u's loss ``-log q + h`` (two non-negative terms). The row's
stats ``(lse, q, h)`` are stored as float64 (h = 0 in the other modes). Only additions,
products and quotients run in float64; exp and log stay float32 (float64 transcendentals
are not lowered on every GPU), which costs nothing here: each is of a small, well-scaled
argument. Pass 2 (when a gradient scale is given) streams the row again and writes the
gradient, ``p_j = exp((z_j - hi) - lo)`` with the lse split into two floats (a float32 lse
near 40 is off by up to 2e-6, an error every p_j would inherit). The forward of the op
runs pass 1; its backward runs pass 2 with the saved stats; a caller that knows the
upstream scale up front (fused linear CE) gets loss and gradient from ONE launch.

Non-finite input: a NaN or +inf logit in a kept row gives NaN loss, stats and gradient;
ignored rows get 0 loss, 0 stats and a zero gradient whatever they hold; a label outside
[0, V) (not ignore_index) is never read and gives a NaN loss, stats and gradient row.
ce_u without another finite logit in the row (r = 0/0) gives a NaN loss and gradient. ce_u
and uce with alpha = 1 have c = -p_y / q, beyond float32 once q < ~1e-38 (a label logit ~87
above the others), where p_j underflows: ce_u folds log|c| into the exponent of pass 2 (and
keeps q in float64 down to ~1e-308); uce with alpha = 1 gives a NaN gradient there.

Imported lazily (``import triton`` happens here only), see ``unlearnopt.kernels``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearnopt.kernels._launch import check_gradient_args, device_guard, row_launch_settings

MODE_NLL, MODE_GA, MODE_UCE, MODE_WGA, MODE_SATIMP, MODE_CE_U = 0, 1, 2, 3, 4, 5
MODE_NAMES = ("nll", "ga", "uce", "wga", "satimp", "ce_u")


@triton.jit
def _log1p(x):
    """log(1 + x) to full relative precision without libdevice: with u = 1 + x rounded,
    log(u) * x / (u - 1) cancels the rounding of u (Goldberg)."""
    u = 1.0 + x
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / den))


@triton.jit
def _exp_f64(d):
    """exp(d) as float64 for a float32 d <= 0, without float32's underflow below -87: 2^k
    built in the exponent bits, times the float32 exp of d - k ln2 in [0, ln2). Down to
    d ~ -708 (then 0)."""
    k = tl.maximum(tl.floor(d * 1.4426950408889634), -1022.0)
    r = (d.to(tl.float64) - k.to(tl.float64) * 0.6931471805599453).to(tl.float32)
    two_k = ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    return tl.exp(r).to(tl.float64) * two_k


@triton.jit
def _log_f64(x):
    """log(x) for a float64 x in (0, 1], also below float32's range (to ~1e-308), without
    float64 transcendentals: exponent from the bits, float32 log of the mantissa in [1, 2).
    0 gives -inf, NaN stays NaN."""
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    mant = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
    out = e.to(tl.float64) * 0.6931471805599453 + tl.log(mant.to(tl.float32)).to(tl.float64)
    return tl.where(x > 0.0, out, tl.where(x == 0.0, float("-inf"), float("nan")))


@triton.heuristics(
    {
        # Every chunk is full: loads and stores drop their masks.
        "EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0,
        # Backward / fused call: the stats come from the forward, skip pass 1.
        "HAS_STATS_IN": lambda args: args["stats_in_ptr"] is not None,
        "HAS_GRAD": lambda args: args["scale_ptr"] is not None,
    }
)
@triton.jit
def _unlearning_ce_rows_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    loss_ptr,
    stats_ptr,
    stats_in_ptr,
    scale_ptr,
    scale_stride,
    grad_ptr,
    grad_row_stride,
    V,
    alpha,
    beta1,
    beta2,
    ignore_index,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EVEN_V: tl.constexpr,
    HAS_STATS_IN: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    # int64 before multiplying by the stride: row * stride passes 2^31 on big batches.
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    y = tl.load(labels_ptr + row)
    keep = y != ignore_index
    valid = (y >= 0) & (y < V)
    y_safe = tl.where(keep & valid, y, 0)
    # Read before pass 2: with grad_ptr == logits_ptr the row is overwritten there.
    z_y = tl.load(z_row + y_safe).to(tl.float32)

    if HAS_STATS_IN:
        lse = tl.load(stats_in_ptr + 3 * row)
        q = tl.load(stats_in_ptr + 3 * row + 1)
        h = tl.load(stats_in_ptr + 3 * row + 2)
    else:
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        # ce_u: u = sum exp(z - m) (z - m) <= 0, and s split as top + rest (top: the columns
        # at the max, each exactly 1), so that log s = log top + log1p(rest / top) keeps its
        # digits when one column dominates (small entropy).
        u = tl.zeros((), tl.float32)
        top = tl.zeros((), tl.float32)
        rest = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            if EVEN_V:
                z = tl.load(z_row + cols).to(tl.float32)
            else:
                z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            z = tl.where(cols == y_safe, float("-inf"), z)  # the label's column: not summed
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # exp(-inf - -inf) would be NaN while nothing finite has been seen.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp(m - m_safe)
            e = tl.exp(z - m_safe)
            if MODE == 5:
                # d = m_old - m_new <= 0: u <- (u + d s) e^d. Before any finite value s = 0
                # (d = -inf then). z = -inf: its exponent is floored so 0 * it stays 0.
                d = tl.where(s == 0.0, 0.0, m - m_safe)
                x = z - m_safe
                x = tl.where(x < -100.0, -100.0, x)  # NaN stays NaN
                u = (u + d * s) * rescale + tl.sum(e * x, axis=0)
                at_max = x == 0.0
                grow = m_new > m
                rest = tl.where(grow, (rest + top) * rescale, rest)
                rest += tl.sum(tl.where(at_max, 0.0, e), axis=0)
                top = tl.where(grow, 0.0, top) + tl.sum(at_max.to(tl.float32), axis=0)
            s = s * rescale + tl.sum(e, axis=0)
            m = m_new
        # z_y into the max. Transcendentals stay float32 (no float64 exp/log on every GPU);
        # the sums and the lse are formed in float64.
        m_all = tl.maximum(m, z_y)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        if MODE == 5:
            # ce_u's gradient needs 1 - p_y below float32's range too (see below).
            others = tl.where(s == 0.0, 0.0, s.to(tl.float64) * _exp_f64(m - m_all))
        else:
            others = tl.where(s == 0.0, 0.0, s.to(tl.float64) * tl.exp(m - m_all).to(tl.float64))
        e_y = tl.exp(z_y - m_all).to(tl.float64)
        total = others + e_y
        # total is 1 + rest (the max term is 1): log1p keeps a small rest's digits.
        lse = m_all.to(tl.float64) + _log1p((total - 1.0).to(tl.float32)).to(tl.float64)
        q = others / total
        # tl.maximum drops a NaN z_y; a NaN label logit must still poison the row.
        label_nan = z_y != z_y
        lse = tl.where(label_nan, float("nan"), lse)
        q = tl.where(label_nan, float("nan"), q)
        if MODE == 5:
            # Entropy of softmax over the other classes; none finite (top = 0): NaN.
            h = (tl.log(top) + _log1p(rest / top) - u / (top + rest)).to(tl.float64)
            h += q * 0.0  # NaN with the row (e.g. z_y = +inf)
        else:
            h = q * 0.0  # 0, NaN with the row
    bad = keep & ~valid
    lse = tl.where(bad, float("nan"), tl.where(keep, lse, 0.0))
    q = tl.where(bad, float("nan"), tl.where(keep, q, 0.0))
    h = tl.where(bad, float("nan"), tl.where(keep, h, 0.0))
    if not HAS_STATS_IN:
        tl.store(stats_ptr + 3 * row, lse)
        tl.store(stats_ptr + 3 * row + 1, q)
        tl.store(stats_ptr + 3 * row + 2, h)

    # Loss and row coefficient c (d loss / d z = c (p - e_y)):
    # nll = -log1p(-q) while p_y > 1/2, else lse - z_y; uce's 1 - a p_y as (1 - a) + a q
    # once a p_y >= 1/2 (no cancellation even for a = 1); log q as log(q) while q < 1/2, else
    # log1p(-p_y); the weights as exp(b1 log p_y + b2 log q), a zero exponent giving 1.
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    p_y = tl.exp((z_y - hi) - lo)
    q32 = q.to(tl.float32)
    nll = tl.where(
        q32 < 0.5,
        -_log1p(-tl.where(q32 < 0.5, q32, 0.0)),
        (lse - z_y.to(tl.float64)).to(tl.float32),
    )
    if MODE == 0:
        loss = nll
        c = 1.0
    elif MODE == 1:
        loss = -nll
        c = -1.0
    elif MODE >= 3:
        # q below float32's range: log q from its float64 value would be -inf; the float32
        # log of the float64 q is fine down to ~1e-45, below which the weight is 0 anyway.
        log_q = tl.where(q32 < 0.5, tl.log(q32), _log1p(-tl.where(q32 < 0.5, 0.0, p_y)))
        if MODE == 5:
            # c = -p_y / q overflows float32 when p_y -> 1 (before p_j underflows), so it is
            # folded into the exponent of the gradient pass: c p_j = -exp(z_j - (lse - t)),
            # t = log(p_y / q) the label's log-odds, z_j - (lse - t) <= 0 for j != y; and
            # c (p_y - 1) = p_y. log q in float64 (q may be below float32's range).
            log_q64 = tl.where(q < 0.5, _log_f64(q), log_q.to(tl.float64))
            loss = (h - log_q64).to(tl.float32)
            t = -nll.to(tl.float64) - log_q64
            fold = t > 0.0
            c = tl.where(fold, -1.0, -p_y / q32)
            shift = lse - tl.where(fold, t, 0.0)
            hi = shift.to(tl.float32)
            lo = (shift - hi.to(tl.float64)).to(tl.float32)
        else:
            log_w = tl.where(beta1 == 0.0, 0.0, -beta1 * nll)
            if MODE == 4:
                log_w += tl.where(beta2 == 0.0, 0.0, beta2 * log_q)
            w = tl.exp(log_w)
            loss = -w * nll
            c = -w
    else:
        ap = alpha * p_y
        small = ap < 0.5
        one_minus = tl.where(small, 1.0 - ap, ((1.0 - alpha) + alpha * q).to(tl.float32))
        loss = tl.where(small, -_log1p(-tl.where(small, ap, 0.0)), -tl.log(one_minus))
        c = -ap / one_minus
    loss = tl.where(bad, float("nan"), tl.where(keep, loss, 0.0))
    tl.store(loss_ptr + row, loss)

    if HAS_GRAD:
        scale = tl.load(scale_ptr + row * scale_stride)
        coef = tl.where(keep, scale * c, 0.0)
        if MODE == 5:
            label_term = tl.where(keep, scale * p_y, 0.0)  # scale (-p_y / q) (p_y - 1)
        else:
            label_term = -coef * q32  # coef * (p_y - 1)
        g_row = grad_ptr + row * grad_row_stride
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            if EVEN_V:
                z = tl.load(z_row + cols).to(tl.float32)
            else:
                z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            p = tl.exp((z - hi) - lo)
            g = tl.where(cols == y_safe, label_term, coef * p)
            # Ignored rows: exactly 0 (0 * p would be NaN for a NaN logit).
            g = tl.where(keep, g, 0.0).to(grad_ptr.dtype.element_ty)
            if EVEN_V:
                tl.store(g_row + cols, g)
            else:
                tl.store(g_row + cols, g, mask=cols < V)


def _check_rows(
    name: str, t: torch.Tensor, n: int, dtype: torch.dtype, device: torch.device
) -> None:
    if t.dtype != dtype or t.dim() != 1 or t.shape[0] != n or t.device != device:
        raise ValueError(
            f"{name} must be a [{n}] {dtype} tensor on {device}, got "
            f"{tuple(t.shape)} {t.dtype} on {t.device}"
        )


def unlearning_cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: int,
    alpha: float,
    ignore_index: int,
    stats_in: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    beta1: float = 1.0,
    beta2: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and stats ``(lse, 1 - p_y, h)``, and optionally the gradient, in one launch.

    Args:
        logits: ``[N, V]`` float32 / bfloat16 / float16, unit column stride, any row stride.
        labels: ``[N]`` int64, in ``[0, V)`` or ``ignore_index`` (others give NaN rows).
        mode: 0 = nll (``-log p_y``), 1 = ga (``log p_y``), 2 = uce
            (``-log(1 - alpha p_y)``), 3 = wga (``w log p_y``, ``w = p_y^beta1``), 4 = satimp
            (``w log p_y``, ``w = p_y^beta1 (1 - p_y)^beta2``), 5 = ce_u (cross-entropy
            against softmax of the logits with the label's at -inf); weights and targets
            detached.
        alpha: the uce parameter (unused by the other modes).
        ignore_index: rows with this label get loss 0 and gradient 0.
        stats_in: ``[N, 3]`` float64 stats from an earlier call in the same mode; skips
            the reduction pass and is returned as ``stats``.
        grad_scale: float32 with 1 (broadcast) or N elements. When given, writes
            ``grad_out[i] = grad_scale[i] * c_i * (softmax(logits[i]) - onehot(y_i))``, with
            ``c = 1, -1, -alpha p_y / (1 - alpha p_y), -w, -w, -p_y / (1 - p_y)`` for nll,
            ga, uce, wga, satimp, ce_u.
        grad_out: ``[N, V]``, unit column stride; required with ``grad_scale``. May be
            ``logits`` itself: the gradient then overwrites the logits in place.
        beta1, beta2: the exponents of p_y (wga, satimp) and of 1 - p_y (satimp), >= 0.

    Returns:
        ``(loss [N] float32, stats [N, 3] float64)``; rows ``(lse, 1 - p_y, h)`` with h the
        entropy of softmax over the other classes (ce_u; 0 in the other modes), all 0 (and
        the loss 0) at ignored rows.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be [N, V] with unit column stride, got shape "
            f"{tuple(logits.shape)} strides {logits.stride()}"
        )
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
    if mode not in range(len(MODE_NAMES)):
        names = ", ".join(f"{i} ({name})" for i, name in enumerate(MODE_NAMES))
        raise ValueError(f"mode must be one of {names}, got {mode!r}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(value) < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    n, vocab = logits.shape
    device = logits.device
    _check_rows("labels", labels, n, torch.int64, device)
    labels = labels.contiguous()
    if stats_in is not None:
        if (
            stats_in.dtype != torch.float64
            or tuple(stats_in.shape) != (n, 3)
            or stats_in.device != device
        ):
            raise ValueError(
                f"stats_in must be a [{n}, 3] float64 tensor on {device}, got "
                f"{tuple(stats_in.shape)} {stats_in.dtype} on {stats_in.device}"
            )
        stats_in = stats_in.contiguous()
    grad_scale, scale_stride = check_gradient_args(logits, grad_scale, grad_out)

    loss = torch.empty(n, dtype=torch.float32, device=device)
    stats = (
        stats_in if stats_in is not None else torch.empty(n, 3, dtype=torch.float64, device=device)
    )
    if n == 0:
        return loss, stats

    block_v, num_warps = row_launch_settings(vocab, logits.dtype, rows_per_chunk=1)
    with device_guard(device):
        _unlearning_ce_rows_kernel[(n,)](
            logits,
            logits.stride(0),
            labels,
            loss,
            stats,
            stats_in,
            grad_scale,
            scale_stride,
            grad_out,
            grad_out.stride(0) if grad_out is not None else 0,
            vocab,
            float(alpha),
            float(beta1),
            float(beta2),
            int(ignore_index),
            MODE=mode,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return loss, stats
