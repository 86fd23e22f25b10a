"""masked_kl / fused_linear_masked_kl with the reference's label logit lowered
(``ref_labels``, ``ref_label_shift``) and ``cross_entropy=True`` (UNDIAL's target and loss):
every backend against a plain-PyTorch formula written here, fused linear against unfused,
CE vs KL (same gradient, values differ by the target's entropy), and the input checks."""

from __future__ import annotations

import pytest
import torch

from tests.assertions import assert_allclose
from tests.conftest import seeded
from unlearnopt.ops.fused_linear_masked_kl import fused_linear_masked_kl
from unlearnopt.ops.masked_kl import masked_kl
from unlearnopt.reference import masked_kl as ref

GAMMA = 3.0


def plain(
    logits,
    ref_logits,
    labels,
    gamma,
    token_mask=None,
    vocab_mask=None,
    temperature=1.0,
    cross_entropy=True,
):
    """Per-token ``m_t * loss_t`` in float64: q = softmax((r - gamma e_y) / T),
    CE = -sum_v u_v q_v log p_v, KL = sum_v u_v q_v (log q_v - log p_v)."""
    vocab = logits.shape[-1]
    z = logits.double().reshape(-1, vocab)
    r = ref_logits.double().reshape(-1, vocab).clone()
    y = labels.reshape(-1)
    for i in range(len(y)):
        if int(y[i]) != -100:
            r[i, int(y[i])] -= gamma
    log_p = (z / temperature).log_softmax(-1)
    log_q = (r / temperature).log_softmax(-1)
    u = torch.ones(vocab, dtype=torch.float64) if vocab_mask is None else vocab_mask.double()
    inner = -log_p if cross_entropy else log_q - log_p
    per_token = (u * log_q.exp() * inner).sum(-1)
    m = torch.ones(len(y), dtype=torch.float64) if token_mask is None else token_mask.double()
    return (m.reshape(-1) * per_token).reshape(logits.shape[:-1])


def mean_over(per_token, token_mask):
    count = per_token.numel() if token_mask is None else int((token_mask != 0).sum())
    return per_token.sum() / max(count, 1)


def inputs(n, vocab, seed=0, device="cpu"):
    g = seeded(seed)
    logits = torch.randn(n, vocab, generator=g) * 3
    ref_logits = torch.randn(n, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[1] = -100
    # The label at the reference's argmax on one row: lowering it moves the most mass.
    labels[0] = int(ref_logits[0].argmax())
    token_mask = torch.rand(n, generator=g) > 0.25
    token_mask[0] = True
    vocab_mask = (torch.rand(vocab, generator=g) > 0.2).float()
    return [t.to(device) for t in (logits, ref_logits, labels, token_mask, vocab_mask)]


@pytest.mark.parametrize("cross_entropy", [True, False], ids=["ce", "kl"])
@pytest.mark.parametrize("with_vocab_mask", [False, True], ids=["u1", "u"])
@pytest.mark.parametrize("vocab", [3, 257])
def test_matches_plain_formula(backend, device, vocab, with_vocab_mask, cross_entropy):
    logits, ref_logits, labels, tmask, vmask = inputs(6, vocab, device=device)
    vmask = vmask if with_vocab_mask else None
    x = logits.clone().requires_grad_()
    got = masked_kl(
        x,
        ref_logits,
        token_mask=tmask,
        vocab_mask=vmask,
        reduction="none",
        temperature=1.5,
        ref_labels=labels,
        ref_label_shift=GAMMA,
        cross_entropy=cross_entropy,
        backend=backend,
    )
    up = torch.randn(got.shape, generator=seeded(4)).to(device)
    (got * up).sum().backward()
    xd = logits.cpu().double().requires_grad_()
    want = plain(
        xd,
        ref_logits.cpu(),
        labels.cpu(),
        GAMMA,
        tmask.cpu(),
        None if vmask is None else vmask.cpu(),
        1.5,
        cross_entropy,
    )
    (want * up.cpu().double()).sum().backward()
    assert got.dtype == torch.float32
    assert_allclose("loss", got.cpu(), want, rtol=1e-4, atol=2e-5)
    assert_allclose("grad", x.grad.cpu(), xd.grad, rtol=1e-3, atol=2e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_3d_match_plain_formula(backend, device, reduction):
    """[B, T, V] logits with [B, T] labels and token mask (UNDIAL's call)."""
    logits, ref_logits, labels, tmask, _ = inputs(8, 19, seed=2, device=device)
    shape = (2, 4)
    x = logits.reshape(*shape, 19).clone().requires_grad_()
    got = masked_kl(
        x,
        ref_logits.reshape(*shape, 19),
        token_mask=tmask.reshape(shape),
        reduction=reduction,
        ref_labels=labels.reshape(shape),
        ref_label_shift=GAMMA,
        cross_entropy=True,
        backend=backend,
    )
    got.backward()
    xd = logits.cpu().double().reshape(*shape, 19).requires_grad_()
    per_token = plain(xd, ref_logits.cpu(), labels.cpu(), GAMMA, tmask.cpu())
    want = per_token.sum() if reduction == "sum" else mean_over(per_token, tmask.cpu())
    want.backward()
    assert_allclose("loss", got.cpu(), want, rtol=1e-5, atol=1e-6)
    assert_allclose("grad", x.grad.cpu(), xd.grad, rtol=1e-3, atol=2e-6)


def test_shift_and_cross_entropy_change_what_they_should(backend, device):
    """The shift changes the loss of labelled tokens only; CE and KL have the same gradient
    and differ by the target's entropy H(q) = -sum q log q, per token."""
    logits, ref_logits, labels, _, _ = inputs(5, 23, seed=3, device=device)

    def run(**kw):
        x = logits.clone().requires_grad_()
        loss = masked_kl(x, ref_logits, reduction="none", backend=backend, **kw)
        loss.sum().backward()
        return loss.detach(), x.grad

    kl_plain, _ = run()
    kl, g_kl = run(ref_labels=labels, ref_label_shift=GAMMA)
    ce, g_ce = run(ref_labels=labels, ref_label_shift=GAMMA, cross_entropy=True)
    labelled = labels != -100
    assert bool((kl - kl_plain)[labelled].abs().gt(1e-5).all())
    assert_allclose("ignored label", kl[~labelled], kl_plain[~labelled], rtol=1e-6, atol=1e-7)
    assert_allclose("same gradient", g_ce, g_kl, rtol=1e-5, atol=1e-7)
    r = ref_logits.double().clone()
    rows = labelled.nonzero()[:, 0]
    r[rows, labels[labelled]] -= GAMMA
    log_q = r.log_softmax(-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    assert_allclose("CE - KL = H(q)", (ce - kl).double(), entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_matches_unfused(backend, device, reduction, with_bias):
    g = seeded(6)
    n, h, h_ref, vocab = 9, 8, 6, 37
    hidden = torch.randn(n, h, generator=g).to(device)
    weight = torch.randn(vocab, h, generator=g).to(device)
    bias = torch.randn(vocab, generator=g).to(device) if with_bias else None
    ref_hidden = torch.randn(n, h_ref, generator=g).to(device)
    ref_weight = torch.randn(vocab, h_ref, generator=g).to(device)
    ref_bias = torch.randn(vocab, generator=g).to(device) if with_bias else None
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    labels[3] = -100
    tmask = (torch.rand(n, generator=g) > 0.2).to(device)
    options = {
        "token_mask": tmask,
        "reduction": reduction,
        "ref_labels": labels,
        "ref_label_shift": GAMMA,
        "cross_entropy": True,
    }

    def leaves():
        out = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        return out + ([bias.clone().requires_grad_()] if with_bias else [])

    up = torch.randn(n, generator=seeded(8)).to(device)
    fused = leaves()
    got = fused_linear_masked_kl(
        fused[0],
        fused[1],
        ref_hidden,
        ref_weight,
        *fused[2:],
        ref_bias,
        chunk_size=4,
        backend=backend,
        **options,
    )
    (got * up if reduction == "none" else got).sum().backward()
    unfused = leaves()
    logits = torch.nn.functional.linear(unfused[0], unfused[1], *unfused[2:])
    ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias)
    want = masked_kl(logits, ref_logits, backend=backend, **options)
    (want * up if reduction == "none" else want).sum().backward()
    assert_allclose("loss", got, want, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("hidden", "weight", "bias"), fused, unfused):
        assert_allclose(f"grad {name}", a.grad, b.grad, rtol=1e-4, atol=1e-6)
    # ... and both equal the plain formula on the same logits.
    plain_tokens = plain(logits.detach().cpu(), ref_logits.cpu(), labels.cpu(), GAMMA, tmask.cpu())
    expected = plain_tokens if reduction == "none" else mean_over(plain_tokens, tmask.cpu())
    assert_allclose("plain", got.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_fused_linear_lowers_chunks_not_a_full_copy(backend, device, monkeypatch):
    """The fused-linear path lowers each chunk's reference logits (at most chunk_size rows
    at a time), never an [N, V] copy."""
    if backend == "reference":
        pytest.skip("the reference materialises the logits by design")
    seen = []
    lower = ref.lower_label_logits_

    def spy(rows, labels, shift):
        seen.append(tuple(rows.shape))
        return lower(rows, labels, shift)

    monkeypatch.setattr(ref, "lower_label_logits_", spy)
    g = seeded(1)
    h = torch.randn(10, 4, generator=g).to(device).requires_grad_()
    w = torch.randn(13, 4, generator=g).to(device)
    labels = torch.randint(0, 13, (10,), generator=g).to(device)
    loss = fused_linear_masked_kl(
        h,
        w,
        h.detach(),
        w + 0.1,
        ref_labels=labels,
        ref_label_shift=2.0,
        cross_entropy=True,
        chunk_size=3,
        backend=backend,
    )
    loss.backward()
    assert seen and all(rows <= 3 and v == 13 for rows, v in seen), seen


def test_bf16(backend, device):
    """bfloat16 inputs (the shift is applied in the logits' dtype, math in float32)."""
    logits, ref_logits, labels, tmask, _ = inputs(6, 64, seed=5, device=device)
    x = logits.bfloat16().requires_grad_()
    got = masked_kl(
        x,
        ref_logits.bfloat16(),
        token_mask=tmask,
        ref_labels=labels,
        ref_label_shift=GAMMA,
        cross_entropy=True,
        reduction="none",
        backend=backend,
    )
    got.sum().backward()
    xd = logits.bfloat16().double().cpu().requires_grad_()
    want = plain(xd, ref_logits.bfloat16().cpu(), labels.cpu(), GAMMA, tmask.cpu())
    want.sum().backward()
    assert_allclose("loss", got.cpu(), want, rtol=2e-2, atol=2e-2)
    assert_allclose("grad", x.grad.float().cpu(), xd.grad, rtol=3e-2, atol=3e-3)


def test_out_of_range_label_without_eager_check_gives_nan(backend, device, monkeypatch):
    """With the label range unread (UNLEARNOPT_CHECK_LABELS=0), an out-of-range label gives
    its token a NaN loss (never an out-of-bounds write); the other tokens are unaffected."""
    monkeypatch.setenv("UNLEARNOPT_CHECK_LABELS", "0")
    logits, ref_logits, labels, _, _ = inputs(4, 11, seed=7, device=device)
    bad = labels.clone()
    bad[2] = 11
    kw = {"reduction": "none", "ref_label_shift": GAMMA, "cross_entropy": True}
    got = masked_kl(logits, ref_logits, ref_labels=bad, backend=backend, **kw)
    good = masked_kl(logits, ref_logits, ref_labels=labels, backend=backend, **kw)
    assert bool(got[2].isnan())
    keep = torch.tensor([True, True, False, True], device=device)
    assert_allclose("other tokens", got[keep], good[keep], rtol=1e-6, atol=1e-7)


def test_errors(device):
    logits, ref_logits, labels, _, _ = inputs(4, 10, device=device)
    with pytest.raises(ValueError, match="ref_label_shift is set but ref_labels is None"):
        masked_kl(logits, ref_logits, ref_label_shift=1.0)
    for shift in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="ref_label_shift"):
            masked_kl(logits, ref_logits, ref_labels=labels, ref_label_shift=shift)
    with pytest.raises(ValueError, match="cross_entropy=True needs direction='forward'"):
        masked_kl(logits, ref_logits, direction="reverse", cross_entropy=True)
    with pytest.raises(TypeError, match="cross_entropy"):
        masked_kl(logits, ref_logits, cross_entropy=1)
    with pytest.raises(TypeError, match="ref_labels"):
        masked_kl(logits, ref_logits, ref_labels=labels.float(), ref_label_shift=1.0)
    with pytest.raises(TypeError, match="ref_labels"):
        masked_kl(logits, ref_logits, ref_labels=[1, 2, 3, 4], ref_label_shift=1.0)
    with pytest.raises(ValueError, match="ref_labels has shape"):
        masked_kl(logits, ref_logits, ref_labels=labels[:3], ref_label_shift=1.0)
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"ref_labels must lie in \[0, 10\)"):
            masked_kl(logits, ref_logits, ref_labels=labels.clamp(min=0) + 9, ref_label_shift=1.0)
    h, w = torch.randn(4, 3, device=device), torch.randn(10, 3, device=device)
    with pytest.raises(ValueError, match="ref_labels has shape"):
        fused_linear_masked_kl(h, w, h, w, ref_labels=labels[:2], ref_label_shift=1.0)
    with pytest.raises(ValueError, match="cross_entropy=True needs direction='forward'"):
        fused_linear_masked_kl(h, w, h, w, direction="reverse", cross_entropy=True)
    with pytest.raises(ValueError, match="ref_label_shift is set"):
        fused_linear_masked_kl(h, w, h, w, ref_label_shift=2.0)
