"""The raw Triton row launcher ``unlearning_cross_entropy_rows`` against float64 formulas.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (set by conftest.py); the interpreter is
slow, so shapes stay small. The public op (autograd, reductions) is tested in
test_unlearning_cross_entropy.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.assertions import assert_within
from tests.conftest import backend_skip_reason, seeded
from unlearnopt.kernels import interpreting

_why = backend_skip_reason("triton")
pytestmark = pytest.mark.skipif(_why is not None, reason=str(_why))

IGNORE = -100
ALPHA = 0.7
# wga / satimp exponents: not the defaults, non-integer (p_y^beta1 (1 - p_y)^beta2).
BETA1, BETA2 = 2.5, 1.5
MODE_IDS = {"nll": 0, "ga": 1, "uce": 2, "wga": 3, "satimp": 4, "ce_u": 5}
# Error of fp32 log-probabilities, per unit of |z| + |lse| (+1): 16 fp32 ulps, covering the
# rounding of the running sum, of its log and of z - lse.
LOGP_ERR = 2e-6


def rows(*args, **kwargs):
    from unlearnopt.kernels.unlearning_cross_entropy import unlearning_cross_entropy_rows

    kwargs.setdefault("beta1", BETA1)
    kwargs.setdefault("beta2", BETA2)
    return unlearning_cross_entropy_rows(*args, **kwargs)


def make_inputs(n: int, vocab: int, dtype: torch.dtype, ignore: str, device, seed: int = 0):
    gen = seeded(seed)
    # Spread of 3 gives peaked and flat rows; one row has its label dominate (p_y ~ 0.99),
    # where a bf16 true-class term written and corrected later would be badly off.
    logits = 3 * torch.randn(n, vocab, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    logits[0, labels[0]] = logits[0].max() + 4.6 + torch.log(torch.tensor(float(vocab)))
    if ignore == "some":
        labels[1::3] = IGNORE
    elif ignore == "all":
        labels[:] = IGNORE
    return logits.to(device=device, dtype=dtype), labels.to(device)


def oracle(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: int,
    alpha: float,
    scale: torch.Tensor | None = None,
):
    """float64 ``(loss, lse, grad, grad_slack)`` of the rows, from the (already rounded) inputs.

    ``grad_slack`` bounds the error of an fp32 kernel before its final rounding: p_j comes from
    exp(z_j - lse), whose argument is off by a few fp32 ulps of |z_j| + |lse| (``LOGP_ERR``),
    so p_j is off by p_j times that (the true-class term p_y - 1 inherits the error of p_y, not
    a relative error of p_y - 1); uce's coefficient also moves with p_y.
    """
    z = logits.double()
    keep = labels != IGNORE
    safe = torch.where(keep, labels, 0)
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, safe[:, None]).squeeze(1)
    logp_y = z_y - lse
    p_y = logp_y.exp()
    # 1 - p_y and its log over the other classes (no cancellation near p_y = 1).
    log_q = torch.logsumexp(z.scatter(1, safe[:, None], float("-inf")), -1) - lse
    q = log_q.exp()
    if mode == 0:
        loss, c, dc = -logp_y, torch.ones_like(p_y), torch.zeros_like(p_y)
    elif mode == 1:
        loss, c, dc = logp_y, -torch.ones_like(p_y), torch.zeros_like(p_y)
    elif mode in (3, 4):
        # w = p^b1 q^b2; d log w / d log p = b1 - b2 p / q
        b2 = BETA2 if mode == 4 else 0.0
        w = (BETA1 * logp_y + b2 * log_q).exp()
        loss, c, dc = w * logp_y, -w, (BETA1 - b2 * p_y / q).abs()
    elif mode == 5:
        # Cross-entropy against softmax of the other classes: -log q + their entropy.
        r = torch.softmax(z.scatter(1, safe[:, None], float("-inf")), -1)
        entropy = -(r * r.clamp(min=1e-300).log()).sum(-1)
        loss, c, dc = entropy - log_q, -p_y / q, 1 / q
    else:
        # c = -a p / (1 - a p); d log|c| / d log p = 1 / (1 - a p)
        loss, c = -torch.log1p(-alpha * p_y), -(alpha * p_y) / (1 - alpha * p_y)
        dc = 1 / (1 - alpha * p_y)
    zero = torch.zeros_like(loss)
    loss = torch.where(keep, loss, zero)
    grad = slack = None
    if scale is not None:
        p = torch.softmax(z, dim=-1)
        onehot = torch.nn.functional.one_hot(safe, z.shape[1]).double()
        coef = torch.where(keep, scale.double().reshape(-1) * c, zero)
        grad = coef[:, None] * (p - onehot)
        err_logp = LOGP_ERR * (1 + lse.abs()[:, None] + z.abs())
        err_logp_y = LOGP_ERR * (1 + lse.abs() + z_y.abs())
        slack = (
            coef.abs()[:, None] * p * err_logp
            + grad.abs() * (dc * err_logp_y)[:, None]
            + 1e-6 * grad.abs()
        )
    return loss, lse, grad, slack


def one_minus_p_y(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 ``1 - p_y`` per row, summed over the other classes (0 at ignored rows)."""
    z = logits.double()
    keep = labels != IGNORE
    safe = torch.where(keep, labels, 0)
    others = z.scatter(1, safe[:, None], float("-inf"))
    q = (torch.logsumexp(others, -1) - torch.logsumexp(z, -1)).exp()
    return torch.where(keep, q, torch.zeros_like(q))


def check_loss_lse(loss, stats, logits, labels, mode, ref_loss, ref_lse):
    assert loss.dtype == torch.float32 and stats.dtype == torch.float64
    assert loss.shape == labels.shape and stats.shape == (*labels.shape, 3)
    # log p_y = z_y - lse is off by a few fp32 ulps of the terms; the loss moves by
    # |dloss/dlog p_y| times that.
    keep = labels != IGNORE
    z_y = logits.double().gather(1, torch.where(keep, labels, 0)[:, None]).squeeze(1)
    logp_err = LOGP_ERR * (1 + ref_lse.abs() + z_y.abs())
    lse = torch.where(keep, stats[:, 0], ref_lse)
    assert_within("lse", lse.cpu(), ref_lse.cpu(), (LOGP_ERR * (1 + ref_lse.abs())).cpu())
    # 1 - p_y: a sum of positive float32 terms, relative accuracy (no cancellation).
    q = one_minus_p_y(logits, labels).to(stats.device)
    assert_within("1 - p_y", stats[:, 1].cpu(), q.cpu(), (1e-6 * q + 1e-300).cpu())
    assert (stats[~keep] == 0).all()
    p_y = (z_y - ref_lse).exp()
    if mode == 2:  # d loss / d log p_y = a p_y / (1 - a p_y)
        dlogp = ALPHA * p_y / (1 - ALPHA * p_y)
    elif mode in (3, 4):  # w (1 + d log w / d log p_y |log p_y|), w = p_y^b1 q^b2
        b2 = BETA2 if mode == 4 else 0.0
        w = p_y**BETA1 * q**b2
        dlogp = w * (1 + (BETA1 + b2 * p_y / q) * (z_y - ref_lse).abs())
    elif mode == 5:  # -log q moves by p_y / q; the entropy term is checked relatively
        dlogp = p_y / q
    else:
        dlogp = torch.ones_like(ref_lse)
    if mode == 5:  # the entropy of softmax over the other classes, float32 sums
        zd = logits.double()
        r = torch.softmax(zd.scatter(1, torch.where(keep, labels, 0)[:, None], -torch.inf), -1)
        h = torch.where(keep, -(r * r.clamp(min=1e-300).log()).sum(-1), 0.0)
        assert_within("entropy", stats[:, 2].cpu(), h.cpu(), (2e-6 * h + 1e-7).cpu())
    else:
        assert (stats[:, 2] == 0).all()
    loss_tol = torch.where(keep, logp_err * dlogp + 1e-6 * ref_loss.abs(), 0.0)
    assert_within("loss", loss.cpu(), ref_loss.cpu(), loss_tol.cpu())
    assert (loss[labels == IGNORE] == 0).all()


def kernel_rounding(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` the way the kernel's final fp32 -> ``dtype`` store rounds.

    Compiled kernels round to nearest even. The Triton interpreter truncates fp32 -> bf16
    (its cast passes no rounding mode), so under it bf16 results are rounded toward zero.
    """
    if dtype == torch.bfloat16 and interpreting():
        bits = x.float().view(torch.int32) & -65536  # keep sign, exponent, 7 mantissa bits
        return bits.view(torch.float32).double()
    return x.to(dtype).double()


def grad_tolerance(ref_grad: torch.Tensor, slack: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per element: how far the kernel's ``dtype`` result may sit from the fp64 answer.

    Its fp32 value lies within ``slack`` of the answer and rounding is monotone, so the stored
    value lies between the roundings of ``answer - slack`` and ``answer + slack``.
    """
    low = (kernel_rounding(ref_grad - slack, dtype) - ref_grad).abs()
    high = (kernel_rounding(ref_grad + slack, dtype) - ref_grad).abs()
    return torch.maximum(low, high) + 1e-30


CASES = [  # (n, vocab, ignore)
    (1, 3, "none"),
    (7, 1000, "some"),
    (7, 3, "all"),
    (33, 4099, "some"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", list(MODE_IDS.values()), ids=list(MODE_IDS))
@pytest.mark.parametrize("n,vocab,ignore", CASES)
def test_rows_match_float64(n, vocab, ignore, mode, dtype, device):
    logits, labels = make_inputs(n, vocab, dtype, ignore, device, seed=n + vocab + mode)
    per_row = vocab % 2 == 1  # alternate broadcast and per-row upstream scales
    scale = (torch.rand(n if per_row else 1, generator=seeded(n)) * 4 - 2).to(device)
    ref_loss, ref_lse, ref_grad, slack = oracle(logits, labels, mode, ALPHA, scale)

    # Forward only: stats pass.
    loss, lse = rows(logits, labels, mode, ALPHA, IGNORE)
    check_loss_lse(loss, lse, logits, labels, mode, ref_loss, ref_lse)

    # Backward: saved stats, gradient pass only.
    grad = torch.empty_like(logits)
    loss_b, lse_b = rows(logits, labels, mode, ALPHA, IGNORE, lse, scale, grad)
    assert lse_b is lse
    tol = grad_tolerance(ref_grad, slack, dtype)
    assert_within("grad (stats_in)", grad.cpu(), ref_grad.cpu(), tol.cpu())
    check_loss_lse(loss_b, lse, logits, labels, mode, ref_loss, ref_lse)

    # Fused: loss and gradient from one launch, written in place over the logits.
    buf = logits.clone()
    loss_f, lse_f = rows(buf, labels, mode, ALPHA, IGNORE, None, scale, buf)
    check_loss_lse(loss_f, lse_f, logits, labels, mode, ref_loss, ref_lse)
    assert_within("grad (fused, in place)", buf.cpu(), ref_grad.cpu(), tol.cpu())
    if ignore == "all":
        assert (buf == 0).all() and (loss_f == 0).all()


def test_true_class_term_bf16_is_accurate(device):
    # p_y ~ 0.99: the true-class gradient p_y - 1 ~ -0.01 must be accurate to bf16 rounding of
    # the fp64 value (writing p_y in bf16 first, then subtracting 1, is off by up to ~20%).
    vocab = 257
    logits = torch.zeros(2, vocab)
    labels = torch.tensor([5, 100])
    logits[0, 5] = 10.1  # p_y ~ 0.990
    logits[1, 100] = 11.0  # p_y ~ 0.996
    logits = logits.bfloat16().to(device)
    labels = labels.to(device)
    scale = torch.ones(1, device=device)
    _, _, ref_grad, slack = oracle(logits, labels, 0, ALPHA, scale)
    grad = torch.empty_like(logits)
    rows(logits, labels, 0, ALPHA, IGNORE, None, scale, grad)
    g_y = grad[torch.arange(2), labels].double().cpu()
    r_y = ref_grad[torch.arange(2), labels.cpu()]
    s_y = slack[torch.arange(2), labels.cpu()]
    assert (r_y > -0.02).all() and (r_y < -0.002).all()  # the regime of the pitfall
    assert_within("true-class grad", g_y, r_y, grad_tolerance(r_y, s_y, torch.bfloat16))
    assert ((g_y - r_y).abs() < 0.01 * r_y.abs()).all()  # and 1% is far from the pitfall's 20%


def test_large_vocab_and_even_chunks(device):
    from unlearnopt.kernels._launch import row_launch_settings

    for n, vocab, mode in [(2, 70001, 2), (2, 16384, 0)]:
        block, _ = row_launch_settings(vocab, torch.float32)
        assert vocab > block  # several chunks through the online log-sum-exp
        logits, labels = make_inputs(n, vocab, torch.float32, "none", device, seed=vocab)
        scale = torch.tensor([0.5, -1.5], device=device)
        ref_loss, ref_lse, ref_grad, slack = oracle(logits, labels, mode, ALPHA, scale)
        grad = torch.empty_like(logits)
        loss, lse = rows(logits, labels, mode, ALPHA, IGNORE, None, scale, grad)
        check_loss_lse(loss, lse, logits, labels, mode, ref_loss, ref_lse)
        assert_within(
            f"grad V={vocab}",
            grad.cpu(),
            ref_grad.cpu(),
            grad_tolerance(ref_grad, slack, torch.float32).cpu(),
        )


def test_strided_rows_and_separate_grad_stride(device):
    n, vocab = 5, 301
    wide, labels = make_inputs(n, 3 * vocab + 7, torch.bfloat16, "some", device, seed=3)
    logits = wide[:, 2 : 2 + vocab]  # row stride 910, storage offset 2
    labels = labels % vocab
    labels[2] = IGNORE
    grad_wide = torch.full((n, 2 * vocab), 7.0, dtype=torch.bfloat16, device=device)
    grad = grad_wide[:, vocab:]
    scale = torch.linspace(-1, 1, n, device=device)
    ref_loss, ref_lse, ref_grad, slack = oracle(logits, labels, 2, ALPHA, scale)
    before = wide.clone()
    loss, lse = rows(logits, labels, 2, ALPHA, IGNORE, None, scale, grad)
    check_loss_lse(loss, lse, logits, labels, 2, ref_loss, ref_lse)
    assert_within(
        "grad (strided)",
        grad.cpu(),
        ref_grad.cpu(),
        grad_tolerance(ref_grad, slack, torch.bfloat16).cpu(),
    )
    assert torch.equal(wide, before)  # logits untouched when grad_out is elsewhere
    assert (grad_wide[:, :vocab] == 7).all()  # nothing written outside the view


def test_float16_and_empty(device):
    logits, labels = make_inputs(4, 129, torch.float16, "some", device)
    ref_loss, ref_lse, _, _ = oracle(logits, labels, 1, ALPHA)
    loss, lse = rows(logits, labels, 1, ALPHA, IGNORE)
    check_loss_lse(loss, lse, logits, labels, 1, ref_loss, ref_lse)
    empty = torch.empty(0, 10, device=device)
    loss, lse = rows(empty, torch.empty(0, dtype=torch.long, device=device), 0, ALPHA, IGNORE)
    assert loss.shape == (0,) and lse.shape == (0, 3)


def test_launcher_rejects_bad_layouts(device):
    logits = torch.randn(4, 10, device=device)
    labels = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="unit column stride"):
        rows(logits.t(), labels, 0, ALPHA, IGNORE)
    with pytest.raises(ValueError, match=r"labels must be a \[4\] torch\.int64"):
        rows(logits, labels.int(), 0, ALPHA, IGNORE)
    with pytest.raises(ValueError, match="mode must be"):
        rows(logits, labels, 6, ALPHA, IGNORE)
    with pytest.raises(ValueError, match="beta2 must be a finite number >= 0"):
        rows(logits, labels, 4, ALPHA, IGNORE, beta2=-1.0)
    with pytest.raises(ValueError, match="grad_scale must be float32"):
        rows(logits, labels, 0, ALPHA, IGNORE, None, torch.ones(2, device=device), logits)
    with pytest.raises(ValueError, match="grad_out is required"):
        rows(logits, labels, 0, ALPHA, IGNORE, None, torch.ones(1, device=device), None)
    with pytest.raises(ValueError, match="stats_in must be a \\[4, 3\\] float64"):
        rows(logits, labels, 0, ALPHA, IGNORE, torch.zeros(4, device=device))


def test_non_finite_and_out_of_range_rows(device):
    """NaN/+inf in a kept row: NaN loss, stats and gradient; in an ignored row: exactly 0;
    a label outside [0, V): NaN, never read."""
    logits = torch.randn(5, 40, generator=seeded(1))
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2, 5] = float("nan")  # ignored row
    logits[3, 9] = float("nan")  # ignored row, in place below
    labels = torch.tensor([1, 2, IGNORE, IGNORE, 40])
    logits, labels = logits.to(device), labels.to(device)
    for mode in MODE_IDS.values():
        buf = logits.clone()
        loss, stats = rows(
            buf, labels, mode, ALPHA, IGNORE, None, torch.ones(1, device=device), buf
        )
        assert torch.isnan(loss[[0, 1, 4]]).all() and torch.isnan(stats[[0, 1, 4]]).all()
        assert torch.isnan(buf[[0, 1, 4]]).all()
        assert (loss[2:4] == 0).all() and (stats[2:4] == 0).all() and (buf[2:4] == 0).all()


BIG_N, BIG_VOCAB, BIG_STRIDE = 3, 40, 2**30 + 64  # the stride fits int32; 2 * stride does not
BIG_SPAN = (BIG_N - 1) * BIG_STRIDE + BIG_VOCAB


def check_big_row_stride(base: torch.Tensor) -> None:
    """Rows at 0, 2^30 + 64 and 2^31 + 128 elements of the bf16 buffer ``base`` [BIG_SPAN]."""
    x = base.as_strided((BIG_N, BIG_VOCAB), (BIG_STRIDE, 1))
    vals = torch.randn(BIG_N, BIG_VOCAB, generator=seeded(0)).bfloat16()
    x.copy_(vals)
    labels = torch.tensor([1, 5, 39], device=base.device)
    scale = torch.ones(1, device=base.device)
    _, stats = rows(x, labels, 0, ALPHA, IGNORE, None, scale, x)  # gradient in place, too
    _, ref_lse, ref_grad, slack = oracle(vals, labels.cpu(), 0, ALPHA, scale.cpu())
    assert_within("lse (big stride)", stats[:, 0].cpu(), ref_lse, LOGP_ERR * (1 + ref_lse.abs()))
    assert_within(
        "grad (big stride)", x.cpu(), ref_grad, grad_tolerance(ref_grad, slack, torch.bfloat16)
    )


_BIG_STRIDE_SCRIPT = textwrap.dedent(f"""
    import mmap, torch
    from tests.ops.test_triton_unlearning_cross_entropy import check_big_row_stride
    buf = mmap.mmap(-1, {BIG_SPAN} * 2)  # 4 GiB of address space; the pages of 3 rows touched
    check_big_row_stride(torch.frombuffer(buf, dtype=torch.bfloat16, count={BIG_SPAN}))
    print("ok")
""")


def test_row_offsets_are_int64(device):
    # Row 2 starts 2^31 + 128 elements in: with 32-bit offsets it reads outside the buffer.
    if device.type == "cuda":
        if torch.cuda.get_device_properties(device).total_memory < 16 * 2**30:
            pytest.skip("needs a 4 GiB buffer")
        check_big_row_stride(torch.zeros(BIG_SPAN, dtype=torch.bfloat16, device=device))
        return
    # On CPU the buffer is a lazily backed anonymous mmap, in a subprocess so that a
    # regression (a segfault) fails this test instead of killing the session.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", _BIG_STRIDE_SCRIPT],
        check=False,
        cwd=root,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        text=True,
        capture_output=True,
        timeout=300,
    )
    if "mmap" in proc.stderr and ("OSError" in proc.stderr or "MemoryError" in proc.stderr):
        pytest.skip(f"cannot map 4 GiB of address space here: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    )
