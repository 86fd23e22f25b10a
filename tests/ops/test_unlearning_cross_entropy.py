"""unlearning_cross_entropy: every backend against the reference, loss and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tests.assertions import assert_within
from tests.conftest import DEVICE, seeded
from tests.ops.ce_bounds import oracle_bound
from unlearnopt.ops import unlearning_cross_entropy
from unlearnopt.reference.unlearning_cross_entropy import unlearning_cross_entropy as reference

MODES = ("nll", "ga", "uce", "wga", "satimp", "ce_u")
# The exponents the new modes run with: satimp at its paper's (5, 1), wga at a non-default.
MODE_KWARGS = {"wga": dict(beta1=2.0), "satimp": dict(beta1=5.0, beta2=1.0)}
REDUCTIONS = ("mean", "sum", "none")
# (rows, vocab, ignore pattern, 3-D logits): odd sizes, a row of length 1, everything ignored,
# a vocabulary above 65536. The Triton interpreter gets only the cheap ones (see below).
SHAPES = [
    (1, 3, "none", False),
    (7, 1000, "some", True),
    (257, 3, "some", False),
    (7, 32003, "none", False),
    (257, 1000, "all", True),
    (257, 32003, "some", True),
    (2, 70001, "some", False),
]
INTERPRETER_MAX_ELEMENTS = 300_000


def make_case(n, vocab, ignore, dtype, seed=0):
    g = seeded(seed)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    if ignore == "some":
        labels[torch.rand(n, generator=g) < 0.3] = -100
    elif ignore == "all":
        labels[:] = -100
    upstream = torch.rand(n, generator=g) + 0.5
    return logits.to(DEVICE), labels.to(DEVICE), upstream.to(DEVICE)


def loss_and_grad(fn, logits, labels, upstream, reduction, three_d, **kwargs):
    x = logits.detach().clone()
    y = labels
    if three_d:
        x = x.view(1, *x.shape)
        y = y.view(1, -1)
    x.requires_grad_(True)
    loss = fn(x, y, reduction=reduction, **kwargs)
    weight = upstream.view(y.shape) if reduction == "none" else upstream[0]
    (loss * weight).sum().backward()
    return loss.detach().float().reshape(-1), x.grad.reshape(logits.shape)


def too_slow(backend, n, vocab):
    from unlearnopt.kernels import interpreting

    # The interpreter runs programs one by one in Python (~10 ms each): few rows, small rows.
    return (
        backend == "triton" and interpreting() and (n > 40 or n * vocab > INTERPRETER_MAX_ELEMENTS)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "n,vocab,ignore,three_d",
    SHAPES,
    ids=[f"{n}x{v}-{i}{'-3d' if t else ''}" for n, v, i, t in SHAPES],
)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(backend, mode, n, vocab, ignore, three_d, dtype):
    if too_slow(backend, n, vocab):
        pytest.skip("shape too large for the Triton interpreter (covered on GPU)")
    logits, labels, upstream = make_case(n, vocab, ignore, dtype)
    kw = dict(mode=mode, **MODE_KWARGS.get(mode, {}))
    for reduction in REDUCTIONS:
        out = loss_and_grad(
            unlearning_cross_entropy,
            logits,
            labels,
            upstream,
            reduction,
            three_d,
            backend=backend,
            **kw,
        )
        ref_low = loss_and_grad(reference, logits, labels, upstream, reduction, three_d, **kw)
        oracle = loss_and_grad(
            reference, logits.double(), labels, upstream.double(), reduction, three_d, **kw
        )
        for i, what in enumerate(("loss", "grad")):
            assert_within(
                f"{mode}/{reduction}/{what}",
                out[i],
                oracle[i],
                oracle_bound(ref_low[i], oracle[i], out[i].dtype),
            )
        assert out[1].dtype == dtype
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[1].float()).all()


def test_ga_is_exactly_negated_nll(backend):
    logits, labels, _ = make_case(33, 517, "some", torch.float32)
    nll = unlearning_cross_entropy(logits, labels, "nll", reduction="none", backend=backend)
    ga = unlearning_cross_entropy(logits, labels, "ga", reduction="none", backend=backend)
    assert torch.equal(ga, -nll)


def test_uce_is_bounded_and_its_gradient_vanishes(backend):
    alpha = 0.5
    vocab = 101
    labels = torch.arange(4, device=DEVICE)
    logits = torch.zeros(4, vocab, device=DEVICE)
    # p_y -> 1: the loss approaches -log(1 - alpha) from below and never exceeds it.
    logits[torch.arange(4), labels] = torch.tensor([10.0, 30.0, 60.0, 90.0], device=DEVICE)
    loss = unlearning_cross_entropy(
        logits, labels, "uce", reduction="none", alpha=alpha, backend=backend
    )
    assert (loss <= -math.log(1 - alpha) + 1e-6).all()
    assert loss[-1] == pytest.approx(-math.log(1 - alpha), rel=1e-5)
    # p_y -> 0: the gradient norm goes to 0 with p_y (no explosion, unlike ga).
    norms = []
    for z_y in (-5.0, -15.0, -40.0):
        x = torch.zeros(1, vocab, device=DEVICE)
        x[0, 3] = z_y
        x.requires_grad_(True)
        unlearning_cross_entropy(
            x, torch.tensor([3], device=DEVICE), "uce", backend=backend
        ).backward()
        norms.append(float(x.grad.norm()))
    assert norms[0] > norms[1] > norms[2] and norms[2] < 1e-15
    ga_x = torch.zeros(1, vocab, device=DEVICE)
    ga_x[0, 3] = -40.0
    ga_x.requires_grad_(True)
    unlearning_cross_entropy(
        ga_x, torch.tensor([3], device=DEVICE), "ga", backend=backend
    ).backward()
    assert float(ga_x.grad.norm()) > 0.9


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_gives_zero_not_nan(backend, reduction):
    x = torch.randn(5, 11, device=DEVICE, requires_grad=True)
    labels = torch.full((5,), -100, device=DEVICE)
    loss = unlearning_cross_entropy(x, labels, "uce", reduction=reduction, backend=backend)
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_custom_ignore_index_and_inplace_backward(backend):
    logits, labels, upstream = make_case(9, 257, "some", torch.float32, seed=3)
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    expected = loss_and_grad(
        reference, logits, labels, upstream, "none", False, mode="nll", ignore_index=7
    )
    x = logits.clone().requires_grad_(True)
    y = x * 1.0  # a non-leaf buffer the op may overwrite in backward
    loss = unlearning_cross_entropy(
        y, labels, "nll", ignore_index=7, reduction="none", inplace_backward=True, backend=backend
    )
    (loss * upstream).sum().backward()
    torch.testing.assert_close(loss.detach(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, expected[1], rtol=1e-5, atol=1e-6)


def test_non_contiguous_rows(backend):
    wide = torch.randn(6, 300, device=DEVICE)
    x = wide[:, :257].detach().requires_grad_(True)  # row stride 300, not 257
    labels = torch.randint(0, 257, (6,), device=DEVICE)
    unlearning_cross_entropy(x, labels, "ga", backend=backend).backward()
    x_ref = wide[:, :257].detach().clone().requires_grad_(True)
    reference(x_ref, labels, "ga").backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)


def test_gradient_accumulates_across_calls(backend):
    logits, labels, _ = make_case(4, 50, "none", torch.float32)
    x = logits.clone().requires_grad_(True)
    unlearning_cross_entropy(x, labels, "nll", backend=backend).backward()
    once = x.grad.clone()
    unlearning_cross_entropy(x, labels, "nll", backend=backend).backward()
    torch.testing.assert_close(x.grad, 2 * once)


def test_inside_a_model_under_autocast_and_compile(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(40, 16), torch.nn.Linear(16, 40)).to(DEVICE)
    ids = torch.randint(0, 40, (2, 5), device=DEVICE)

    def loss_fn(m):
        return unlearning_cross_entropy(m(ids), ids, "uce", backend=backend)

    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = loss_fn(model)
    loss.backward()
    assert torch.isfinite(loss) and model[1].weight.grad.abs().sum() > 0
    model.zero_grad()
    compiled = torch.compile(loss_fn, backend="aot_eager")
    loss_c = compiled(model)
    loss_c.backward()
    torch.testing.assert_close(loss_c.float(), loss_fn(model).float(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=torch.tensor([0, 11])), r"labels must lie in \[0, 10\)"),
        (dict(labels=torch.tensor([0, -5])), r"labels must lie in \[0, 10\)"),
        (dict(labels=torch.tensor([0, 1, 2])), r"labels has shape \(3,\)"),
        (dict(logits=torch.ones(2, 10, dtype=torch.int64)), r"logits must be a floating tensor"),
        (dict(mode="npo"), r"mode must be one of"),
        (dict(reduction="avg"), r"reduction must be one of"),
        (dict(alpha=0.0), r"alpha must be a number in \(0, 1\]"),
        (dict(alpha=1.5), r"alpha must be a number in \(0, 1\]"),
        (dict(mode="wga", beta1=-1.0), r"beta1 must be a finite number >= 0"),
        (dict(mode="satimp", beta2=float("inf")), r"beta2 must be a finite number >= 0"),
        (dict(beta1=float("nan")), r"beta1 must be a finite number >= 0"),
        (dict(backend="cuda"), r"backend must be one of"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    args = dict(logits=torch.randn(2, 10), labels=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        unlearning_cross_entropy(args.pop("logits"), args.pop("labels"), **args)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.bool]
)
def test_label_dtype_other_than_int64_int32_is_a_type_error(dtype):
    # uint8/int8/int16 used to pass validation and fail inside the reference's gather.
    with pytest.raises(TypeError, match=r"labels must be an int64 or int32 tensor"):
        unlearning_cross_entropy(torch.randn(2, 10), torch.tensor([0, 1]).to(dtype))


def test_int32_labels_match_int64(backend):
    logits, labels, upstream = make_case(6, 37, "some", torch.float32, seed=5)
    a = loss_and_grad(
        unlearning_cross_entropy,
        logits,
        labels,
        upstream,
        "none",
        False,
        mode="uce",
        backend=backend,
    )
    b = loss_and_grad(
        unlearning_cross_entropy,
        logits,
        labels.int(),
        upstream,
        "none",
        False,
        mode="uce",
        backend=backend,
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_out_of_range_labels_without_the_eager_check_give_nan(backend, monkeypatch):
    """With the host check off (the default on accelerators), a bad label's token gets a NaN
    loss and a NaN gradient row on every backend, never a silently wrong number."""
    monkeypatch.setenv("UNLEARNOPT_CHECK_LABELS", "0")
    x = torch.randn(3, 10, device=DEVICE, requires_grad=True)
    labels = torch.tensor([1, 10, -3], device=DEVICE)
    loss = unlearning_cross_entropy(x, labels, "nll", reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.isfinite(x.grad[0]).all() and torch.isnan(x.grad[1:]).all()
    monkeypatch.setenv("UNLEARNOPT_CHECK_LABELS", "1")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        unlearning_cross_entropy(x, labels, backend=backend)


def test_label_range_check_is_host_free_off_cpu(monkeypatch):
    """The eager range check runs for CPU tensors only (on a GPU it is a sync per call)."""
    from unlearnopt.ops._checks import check_labels, eager_label_check

    monkeypatch.delenv("UNLEARNOPT_CHECK_LABELS", raising=False)
    assert eager_label_check(torch.zeros(2, dtype=torch.long))
    meta = torch.full((2,), 99, dtype=torch.long, device="meta")
    assert not eager_label_check(meta)
    check_labels(meta, (2,), 10, -100)  # reading a meta tensor would raise
    monkeypatch.setenv("UNLEARNOPT_CHECK_LABELS", "maybe")
    with pytest.raises(ValueError, match="UNLEARNOPT_CHECK_LABELS"):
        eager_label_check(meta)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_give_non_finite_loss_and_gradient(backend, mode, bad):
    """A row holding NaN/+inf: its loss and gradient are NaN (native uce used to return the
    bound 0.6931 and a finite mean); the same values in an ignored row contribute exactly 0
    loss and 0 gradient on every backend (the reference used to give a NaN gradient)."""
    x = torch.randn(4, 50, generator=seeded(2)).to(DEVICE)
    x[0, 7] = bad  # kept row, another class
    x[1, 2] = bad  # kept row, the label's own logit
    x[3, 11] = bad  # ignored row
    x.requires_grad_(True)
    labels = torch.tensor([1, 2, 3, -100], device=DEVICE)
    loss = unlearning_cross_entropy(x, labels, mode, reduction="none", backend=backend)
    loss.sum().backward()
    assert not torch.isfinite(loss[:2]).any() and torch.isfinite(loss[2:]).all()
    assert loss[3] == 0 and torch.isfinite(x.grad[2]).all()
    assert not torch.isfinite(x.grad[0]).all() and not torch.isfinite(x.grad[1]).all()
    assert torch.equal(x.grad[3], torch.zeros_like(x.grad[3]))
    mean = unlearning_cross_entropy(x, labels, mode, backend=backend)
    assert not torch.isfinite(mean)


@pytest.mark.parametrize(
    "mode,alpha",
    [
        ("nll", 0.5),
        ("ga", 0.5),
        ("uce", 0.5),
        ("uce", 1.0),
        ("wga", 0.5),
        ("satimp", 0.5),
        ("ce_u", 0.5),
    ],
)
def test_sharply_peaked_rows_fp32(backend, mode, alpha):
    """Logits x10 (p_y of the peak near 1), V = 4096, reduction none with a non-uniform
    upstream gradient: per element within 1e-6 relative + 1e-8 absolute of float64 (the fp32
    tolerance of common CE test grids). A float32 lse (off by up to 2e-6 near 40) and
    1 - p_y formed by subtraction used to miss it by up to 8x."""
    n = 6 if too_slow(backend, 40, 1) else 24
    g = seeded(7)
    logits = torch.randn(n, 4096, generator=g) * 10
    labels = torch.randint(0, 4096, (n,), generator=g)
    labels[::2] = logits[::2].argmax(-1)  # half the rows: the label is the peak
    upstream = torch.rand(n, generator=g) + 0.5
    logits, labels, upstream = logits.to(DEVICE), labels.to(DEVICE), upstream.to(DEVICE)
    kw = dict(mode=mode, alpha=alpha, **MODE_KWARGS.get(mode, {}))
    out = loss_and_grad(
        unlearning_cross_entropy, logits, labels, upstream, "none", False, backend=backend, **kw
    )
    oracle = loss_and_grad(
        reference, logits.double(), labels, upstream.double(), "none", False, **kw
    )
    for got, want, what in zip(out, oracle, ("loss", "grad")):
        err = (got.double() - want).abs()
        tol = 1e-6 * want.abs() + 1e-8
        worst = float((err / tol).max())
        assert worst <= 1, f"{mode} a={alpha} {what}: error {worst:.2f} x the tolerance"


def plain_formula(logits, labels, mode, beta1=1.0, beta2=1.0):
    """Per-token loss of the new modes as their papers write them, plain float64 PyTorch
    (weights and targets detached), 0 at ignored tokens: differentiable, for the gradient."""
    z = logits.double()
    keep = labels != -100
    y = torch.where(keep, labels, 0)
    log_p = z.log_softmax(-1)
    log_p_y = log_p.gather(1, y[:, None])[:, 0]
    p_y = log_p_y.detach().exp()
    if mode == "wga":
        loss = p_y**beta1 * log_p_y
    elif mode == "satimp":
        loss = p_y**beta1 * (1 - p_y) ** beta2 * log_p_y
    else:  # ce_u: cross-entropy against softmax with the label's logit at -inf
        target = torch.softmax(z.detach().scatter(1, y[:, None], float("-inf")), -1)
        loss = -(target * log_p.scatter(1, y[:, None], 0.0)).sum(-1)
    return torch.where(keep, loss, torch.zeros_like(loss))


@pytest.mark.parametrize(
    "mode,kw", [("wga", {}), ("wga", dict(beta1=0.5)), ("satimp", dict(beta1=5.0)), ("ce_u", {})]
)
def test_new_modes_match_their_plain_formula(backend, mode, kw):
    """wga / satimp: the detached weight times log p_y; ce_u: the cross-entropy against the
    softmax with the label's logit at -inf (both with ``reduction="none"`` and ``"mean"``)."""
    logits, labels, upstream = make_case(9, 301, "some", torch.float32, seed=4)
    x = logits.double().requires_grad_(True)
    want = plain_formula(x, labels, mode, **kw)
    (want * upstream.double()).sum().backward()
    got = loss_and_grad(
        unlearning_cross_entropy,
        logits,
        labels,
        upstream,
        "none",
        False,
        mode=mode,
        backend=backend,
        **kw,
    )
    torch.testing.assert_close(got[0].double(), want.detach(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(got[1].double(), x.grad, rtol=2e-5, atol=1e-7)
    mean = unlearning_cross_entropy(logits, labels, mode, backend=backend, **kw)
    expected_mean = want.detach().sum() / (labels != -100).sum()
    torch.testing.assert_close(mean.double(), expected_mean, rtol=2e-5, atol=1e-7)


def exact_new_mode(z_y_gap, vocab, mode, beta1, beta2):
    """float64 loss and gradient of one row: logits 0 except ``z_y = z_y_gap`` (label 0),
    from p_y = 1 / (1 + (V - 1) e^-gap) and q = 1 - p_y, both formed without cancellation."""
    gap = torch.tensor(z_y_gap, dtype=torch.float64)
    log_q = -torch.nn.functional.softplus(gap - math.log(vocab - 1))  # log(1 - p_y)
    log_p_y = -torch.nn.functional.softplus(math.log(vocab - 1) - gap)
    p_y, q = log_p_y.exp(), log_q.exp()
    p_other = q / (vocab - 1)
    if mode == "ce_u":  # r is uniform over the V - 1 others: H(r) = log(V - 1)
        loss, c = math.log(vocab - 1) - log_q, -p_y / q
    else:
        w = (beta1 * log_p_y + (beta2 * log_q if mode == "satimp" else 0.0)).exp()
        loss, c = w * log_p_y, -w
    grad = torch.full((vocab,), float(c * p_other), dtype=torch.float64)
    grad[0] = -c * q  # c (p_y - 1)
    return loss, grad


@pytest.mark.parametrize("mode", ["wga", "satimp", "ce_u"])
@pytest.mark.parametrize("gap", [-30.0, -8.0, 0.0, 8.0, 30.0, 60.0, 100.0, 200.0])
def test_new_modes_near_both_ends(backend, mode, gap):
    """p_y from ~1e-16 to 1 - 1e-85: the loss and every gradient entry within 1e-5 relative
    of float64 (the label entry of the gradient is c (p_y - 1), formed from 1 - p_y summed
    over the other classes, never as a difference). Gaps of 100 and 200 put 1 - p_y below
    float32's range: ce_u's coefficient -p_y / (1 - p_y) is then beyond float32 too, and its
    gradient -(1 - p_y)^-1 p_j = -softmax over the other classes must still come out."""
    vocab = 257
    beta1, beta2 = (5.0, 1.0) if mode == "satimp" else (1.0, 1.0)
    want_loss, want_grad = exact_new_mode(gap, vocab, mode, beta1, beta2)
    x = torch.zeros(1, vocab, device=DEVICE)
    x[0, 0] = gap
    x.requires_grad_(True)
    loss = unlearning_cross_entropy(
        x,
        torch.zeros(1, dtype=torch.long, device=DEVICE),
        mode,
        beta1=beta1,
        beta2=beta2,
        backend=backend,
    )
    loss.backward()
    tiny = torch.finfo(torch.float32).tiny
    assert_within("loss", loss.double().cpu(), want_loss, 1e-5 * want_loss.abs() + tiny)
    assert_within("grad", x.grad[0].double().cpu(), want_grad, 1e-5 * want_grad.abs() + tiny)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with > 12 GB free")
def test_more_than_2_pow_31_elements_on_gpu():
    n, vocab = 16400, 131072  # n * vocab > 2**31
    x = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    loss = unlearning_cross_entropy(x, labels, reduction="none", backend="triton")
    last = reference(x[-3:].detach(), labels[-3:], reduction="none")
    torch.testing.assert_close(loss[-3:], last, rtol=2e-2, atol=2e-2)
