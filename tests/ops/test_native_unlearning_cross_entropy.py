"""The raw C++ row kernel ``unlearning_cross_entropy_rows`` against float64 formulas.

The public op (autograd, reductions, every backend) is tested in
``test_unlearning_cross_entropy.py``; this file pins the row contract of the native kernel
(see ``unlearnopt.ops.unlearning_cross_entropy.rows_function``): loss, stats (lse and
1 - p_y, float64), gradient with per-row or broadcast scale, in place, strided rows,
ignored rows, extreme rows, non-finite rows.

Tolerances are derived, not tuned (eps = float32 machine epsilon, 2^-23 ~ 1.2e-7):
- lse: each of the 8 SIMD lanes sums <= 256 terms of a 2048-column chunk in float32 (random
  rounding: ~sqrt(256) eps = 16 eps relative), fast_exp adds ~1 eps, the chunk combination
  and the lse are in double; 32 eps is twice that, plus 2 eps |lse| (kept from the float32
  lse of earlier versions; the float64 lse is far better). 1 - p_y is the same kind of sum
  (over the other classes): 32 eps relative.
- loss: d loss / d lse = -c (the row coefficient: 1, -1, or a p_y / (1 - a p_y) for uce),
  so |err| <= |c| (tol_lse + 4 eps) + 2 eps |loss|: 4 eps for the float32 p_y (uce: the
  loss moves by |c| times the relative error of a p_y), 2 eps for the final log / rounding.
  No absolute floor: a small uce loss must keep its relative accuracy (log1p, not log).
- gradient: p_j = exp(z_j - lse) inherits the lse error as a relative error, plus ~3 eps
  (exp, subtraction, product); for uce c inherits it amplified by 1 / (1 - a p_y). So per
  element |err| <= |scale c| ((p_j + [j = y]) k + FLT_MIN) with k = tol_lse (1 + amp) +
  4 eps, FLT_MIN for the p_j below float32's normal range that fast_exp flushes to 0.
- bfloat16 / float16 gradient (rounded once from float32): if the kernel's float32 value
  g32 and the exact g64 round to the same value the error equals that of the exact value
  rounded, err_ref = |round(g64) - g64|; if not, a rounding midpoint lies between them, so
  err <= (gap around the kernel's value) / 2 + delta <= 2 err_ref + 3 delta (a gap at most
  doubles across a power of two), delta being the float32 bound above.
  The loss and lse are float32 outputs computed from the same (exactly widened) inputs, so
  their float32 bounds hold for low-precision logits too.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.assertions import assert_within
from unlearnopt.native import native_error

EPS32 = torch.finfo(torch.float32).eps
MODES = {"nll": 0, "ga": 1, "uce": 2, "wga": 3, "satimp": 4, "ce_u": 5}
# wga / satimp exponents: not the defaults, non-integer (p_y^beta1 (1 - p_y)^beta2).
BETA1, BETA2 = 2.5, 1.5
IGNORE = -100


@pytest.fixture(scope="module")
def rows():
    why = native_error()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"native build failed in CI: {why}")
        pytest.skip(why)
    from unlearnopt.native import native_ops

    return native_ops().unlearning_cross_entropy_rows


def exact(logits, labels, mode, alpha):
    """float64 loss, lse, coefficient c, p_y, p, p - e_y (rows of zeros where ignored)."""
    z = logits.double()
    keep = labels != IGNORE
    y = torch.where(keep, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    d = z.gather(1, y[:, None])[:, 0] - lse
    p_y = d.exp()
    others = z.scatter(1, y[:, None], float("-inf"))
    log_q = torch.logsumexp(others, -1) - lse
    entropy = torch.zeros_like(d)
    if mode == "nll":
        loss, c = -d, torch.ones_like(d)
    elif mode == "ga":
        loss, c = d, -torch.ones_like(d)
    elif mode in ("wga", "satimp"):
        w = (BETA1 * d + (BETA2 * log_q if mode == "satimp" else 0.0)).exp()
        loss, c = w * d, -w
    elif mode == "ce_u":
        r = torch.softmax(others, -1)
        entropy = -(r * r.clamp(min=1e-300).log()).sum(-1)
        loss, c = entropy - log_q, -(d - log_q).exp()
    else:
        loss = -torch.log1p(-alpha * p_y)
        c = -(alpha * p_y) / (1 - alpha * p_y)
    p = (z - lse[:, None]).exp()
    q = log_q.exp()
    # p - e_y, with the label column as expm1(d) (no cancellation near p_y = 1).
    p_minus = p.scatter(1, y[:, None], torch.expm1(d)[:, None])
    zero = torch.zeros((), dtype=torch.float64)
    return {
        "loss": torch.where(keep, loss, zero),
        "lse": torch.where(keep, lse, zero),
        "q": torch.where(keep, q, zero),
        "entropy": torch.where(keep, entropy, zero),
        "c": c,
        "p_y": p_y,
        "p": p,
        "p_minus": torch.where(keep[:, None], p_minus, zero),
        "y": y,
        "keep": keep,
    }


def check_rows(rows, logits, labels, mode, alpha, *, scale, grad=None, stats_in=None, ref=None):
    """Run the kernel (with a gradient when scale is given) and check it all; ``stats_in`` is
    the stats tensor of an earlier call."""
    # The float64 view is taken before the call: grad may be logits itself.
    r = ref if ref is not None else exact(logits, labels, mode, alpha)
    loss, stats = rows(
        logits, labels, MODES[mode], alpha, IGNORE, stats_in, scale, grad, BETA1, BETA2
    )
    assert stats.dtype == torch.float64 and stats.shape == (len(labels), 3)
    lse, q, h = stats[:, 0], stats[:, 1], stats[:, 2]
    keep, c, p_y = r["keep"], r["c"], r["p_y"]
    tol_lse = 32 * EPS32 + 2 * EPS32 * r["lse"].abs()
    # The entropy of ce_u (0 elsewhere): float32 sums of non-negative terms, as for 1 - p_y.
    tol_h = 32 * EPS32 * r["entropy"]
    if stats_in is None:
        assert_within("lse", torch.where(keep, lse, torch.zeros_like(lse)), r["lse"], tol_lse)
        assert_within("1 - p_y", q, r["q"], 32 * EPS32 * r["q"])
        assert_within("entropy", h, r["entropy"], tol_h)
    # d loss / d lse is -c, except wga / satimp, whose loss w log p_y also moves through w
    # (by beta1 + beta2 p_y / q times w |log p_y| per unit of log p_y) and ce_u (-log q
    # moves by p_y / q = |c|, plus the entropy's own error).
    dloss = c.abs()
    if mode in ("wga", "satimp"):
        b2 = BETA2 if mode == "satimp" else 0.0
        dloss = dloss * (1 + (BETA1 + b2 * p_y / r["q"]) * r["loss"].abs() / c.abs())
    tol_loss = dloss * (tol_lse + 4 * EPS32) + 2 * EPS32 * r["loss"].abs() + tol_h
    tol_loss = torch.where(keep, tol_loss, torch.zeros_like(tol_loss))
    assert_within("loss", loss, r["loss"], tol_loss)
    assert torch.isfinite(stats).all(), "stats must be finite (0 at ignored rows)"
    if grad is None:
        return loss, stats
    coef = scale.double().expand(len(labels)) * c
    ref_grad = coef[:, None] * r["p_minus"]
    # How much c's relative error exceeds p_y's: 1 / (1 - a p_y) for uce, 1 / q for ce_u,
    # |beta1 - beta2 p_y / q| for the weights.
    amp = {
        "uce": 1 / (1 - alpha * p_y),
        "ce_u": 1 / r["q"],
        "wga": torch.full_like(p_y, BETA1),
        "satimp": (BETA1 - BETA2 * p_y / r["q"]).abs(),
    }.get(mode, torch.ones_like(p_y))
    k = tol_lse * (1 + amp) + 4 * EPS32
    bound = r["p"].clone()  # p_j + [j = y]
    bound[torch.arange(len(labels)), r["y"]] += 1
    # + tiny: fast_exp flushes results below FLT_MIN (exp(x) for x < -87.7) to 0.
    delta = coef.abs()[:, None] * (bound * k[:, None] + torch.finfo(torch.float32).tiny)
    delta = torch.where(keep[:, None], delta, torch.zeros_like(delta))
    if grad.dtype == torch.float32:
        tol = delta + EPS32 * ref_grad.abs()
    else:
        err_ref = (ref_grad.to(grad.dtype).double() - ref_grad).abs()
        tol = 2 * err_ref + 3 * delta
    assert_within("grad", grad, ref_grad, tol)
    return loss, stats


def make(n, v, dtype, seed, ignore="some"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore == "some":
        labels[2::3] = IGNORE
    elif ignore == "all":
        labels[:] = IGNORE
    # A few confident rows: p_y close to 1 exercises the expm1 paths.
    if n > 1 and ignore != "all":
        labels[1] = 0
        logits[1, 0] = 30
    return logits, labels


# N in {1, 7, 257} x V in {3, 1000, 32003} and one V > 65536; the largest cell (257 x 32003,
# 8M elements, float64 checks) only in float32 to keep the file fast.
GRID = [
    (dt, n, v)
    for dt in ("f32", "bf16")
    for n in (1, 7, 257)
    for v in (3, 1000, 32003)
    if not (dt == "bf16" and n == 257 and v == 32003)
] + [("f32", 2, 70001), ("bf16", 2, 70001)]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dt,n,v", GRID, ids=[f"{dt}-{n}x{v}" for dt, n, v in GRID])
@pytest.mark.parametrize("mode", list(MODES))
def test_rows_against_float64(rows, mode, dt, n, v):
    alpha = 0.5
    logits, labels = make(n, v, DTYPES[dt], seed=n * 7 + v)
    ref = exact(logits, labels, mode, alpha)
    per_row = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 4 - 2
    # Forward only, then the backward of the autograd op: stats_in + per-row scale, new buffer.
    _, stats = check_rows(rows, logits, labels, mode, alpha, scale=None, ref=ref)
    check_rows(
        rows,
        logits,
        labels,
        mode,
        alpha,
        scale=per_row,
        grad=torch.empty_like(logits),
        stats_in=stats,
        ref=ref,
    )
    # One call doing both (the fused-linear path), in place, broadcast scale.
    buf = logits.clone()
    check_rows(rows, buf, labels, mode, alpha, scale=torch.tensor([0.37]), grad=buf, ref=ref)


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("mode", list(MODES))
def test_ignore_patterns(rows, mode, ignore):
    logits, labels = make(9, 4099, torch.float32, seed=3, ignore=ignore)
    grad = torch.full_like(logits, float("nan"))  # every element must be written
    loss, _ = check_rows(rows, logits, labels, mode, 0.5, scale=torch.tensor([1.5]), grad=grad)
    ignored = labels == IGNORE
    assert (loss[ignored] == 0).all()
    assert (grad[ignored] == 0).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_strided_rows(rows, inplace):
    n, v = 5, 2500
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(n, v + 13, generator=g)
    logits = wide[:, 7 : 7 + v]
    assert not logits.is_contiguous() and logits.stride(1) == 1
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = IGNORE
    if inplace:
        grad, outer = logits, wide
    else:
        outer = torch.zeros(n, v + 20)
        grad = outer[:, 3 : 3 + v]
    before = outer.clone()
    check_rows(rows, logits, labels, "uce", 0.8, scale=torch.tensor([2.0]), grad=grad)
    cols = torch.ones(outer.shape[1], dtype=torch.bool)
    cols[(7 if inplace else 3) : (7 if inplace else 3) + v] = False
    assert torch.equal(outer[:, cols], before[:, cols]), "columns outside the view were touched"


def test_float16(rows):
    logits, labels = make(7, 5003, torch.float16, seed=11)
    _, stats = check_rows(rows, logits, labels, "nll", 0.5, scale=None)
    check_rows(
        rows,
        logits,
        labels,
        "nll",
        0.5,
        scale=torch.rand(7),
        grad=torch.empty_like(logits),
        stats_in=stats,
    )


def test_extreme_rows(rows):
    """Rows that exercise every branch of the online log-sum-exp."""
    v = 3 * 2048 + 5
    logits = torch.randn(5, v, generator=torch.Generator().manual_seed(2))
    logits[0, :2048] = float("-inf")  # leading chunk all -inf
    logits[1] = torch.linspace(-500, 500, v)  # jumps of > 64 between chunks
    logits[2] += 1e4  # large offset
    logits[3, ::2] = float("-inf")  # masked vocabulary
    logits[4, -1] = 200  # a late, dominant column
    labels = torch.tensor([3000, v - 1, 17, 1, v - 1])
    for mode in MODES:
        check_rows(
            rows, logits, labels, mode, 0.5, scale=torch.rand(5), grad=torch.empty_like(logits)
        )


def test_uce_alpha_one_confident(rows):
    # 1 - p_y ~ 1e-4: 1 - alpha p_y formed naively in float32 keeps ~3 digits.
    logits = torch.zeros(3, 1000)
    logits[:, 0] = torch.tensor([14.0, 16.0, 18.0])
    labels = torch.zeros(3, dtype=torch.long)
    check_rows(rows, logits, labels, "uce", 1.0, scale=torch.ones(3), grad=torch.empty_like(logits))


def test_nan_propagates(rows):
    logits = torch.randn(2, 5000)
    logits[0, 4000] = float("nan")
    loss, stats = rows(logits, torch.tensor([1, 2]), 0, 0.5, IGNORE, None, None, None)
    assert torch.isnan(stats[0]).all() and torch.isnan(loss[0])
    assert torch.isfinite(stats[1]).all() and torch.isfinite(loss[1])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", ["label", "other", "late_chunk"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_rows_give_non_finite_loss_and_gradient(rows, mode, where, bad):
    """A kept row holding NaN/+inf: NaN loss, stats and gradient (uce used to return its
    bound, -log(1 - alpha)); the same logits in an ignored row: exactly 0 everywhere."""
    v = 5000
    logits = torch.randn(2, v, generator=torch.Generator().manual_seed(4))
    col = {"label": 3, "other": 10, "late_chunk": 4500}[where]
    logits[:, col] = bad
    labels = torch.tensor([3, IGNORE])
    grad = torch.zeros_like(logits)
    loss, stats = rows(logits, labels, MODES[mode], 0.5, IGNORE, None, torch.ones(1), grad)
    assert torch.isnan(loss[0]) and torch.isnan(stats[0]).all() and torch.isnan(grad[0]).all()
    assert loss[1] == 0 and (stats[1] == 0).all() and (grad[1] == 0).all()


def test_out_of_range_label_gives_nan_row(rows):
    """Never read; NaN loss, stats and gradient (the ops raise before, see _checks)."""
    logits = torch.randn(3, 10)
    grad = torch.zeros_like(logits)
    loss, stats = rows(logits, torch.tensor([1, 10, -5]), 0, 0.5, IGNORE, None, torch.ones(1), grad)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.isnan(stats[1:]).all() and torch.isnan(grad[1:]).all()
    assert torch.isfinite(grad[0]).all()


def test_rejects_bad_input(rows):
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match="labels"):
        rows(logits, labels.int(), 0, 0.5, IGNORE, None, None, None)
    with pytest.raises(RuntimeError, match="logits"):
        rows(logits.t(), labels, 0, 0.5, IGNORE, None, None, None)
    with pytest.raises(RuntimeError, match="logits"):
        rows(logits.double(), labels, 0, 0.5, IGNORE, None, None, None)
    with pytest.raises(RuntimeError, match="mode"):
        rows(logits, labels, 6, 0.5, IGNORE, None, None, None)
    with pytest.raises(RuntimeError, match="beta1, beta2"):
        rows(logits, labels, 3, 0.5, IGNORE, None, None, None, -1.0, 1.0)
    with pytest.raises(RuntimeError, match="alpha"):
        rows(logits, labels, 2, 1.5, IGNORE, None, None, None)
    with pytest.raises(RuntimeError, match="stats_in"):
        rows(logits, labels, 0, 0.5, IGNORE, torch.zeros(4, 3), None, None)  # not float64
    with pytest.raises(RuntimeError, match="stats_in"):
        rows(logits, labels, 0, 0.5, IGNORE, torch.zeros(4, dtype=torch.float64), None, None)
    with pytest.raises(RuntimeError, match="grad_scale"):
        rows(logits, labels, 0, 0.5, IGNORE, None, torch.ones(3), torch.empty_like(logits))
    with pytest.raises(RuntimeError, match="grad_scale and grad_out"):
        rows(logits, labels, 0, 0.5, IGNORE, None, one, None)
    with pytest.raises(RuntimeError, match="grad_out"):
        rows(logits, labels, 0, 0.5, IGNORE, None, one, torch.empty(4, 10, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="grad_out"):
        rows(logits, labels, 0, 0.5, IGNORE, None, one, torch.empty(4, 9))
    wide = torch.randn(4, 11)
    with pytest.raises(RuntimeError, match="grad_out"):  # shifted view of the logits
        rows(wide[:, :10], labels, 0, 0.5, IGNORE, None, one, wide[:, 1:])
