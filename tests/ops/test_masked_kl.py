"""masked_kl: every backend against the reference, loss and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.assertions import assert_allclose
from tests.conftest import seeded
from unlearnopt.ops.masked_kl import (
    masked_kl,
    token_mask_from_labels,
    vocab_mask_from_token_ids,
)
from unlearnopt.reference import masked_kl as ref

DIRECTIONS = ("forward", "reverse")
# (token mask kind, vocab mask?) pairs: none, each mask alone, both with a float token mask.
MASKS = (("none", False), ("bool", False), ("none", True), ("float", True))


def make_inputs(shape, seed=0, scale=3.0, dtype=torch.float32, device="cpu"):
    g = seeded(seed)
    logits = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    ref_logits = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    return logits, ref_logits


def make_masks(kind, with_vocab, lead_shape, vocab, seed=1, device="cpu"):
    g = seeded(seed)
    tmask = None
    if kind == "bool":
        tmask = torch.rand(lead_shape, generator=g) > 0.3
    elif kind == "float":
        tmask = torch.rand(lead_shape, generator=g) * (torch.rand(lead_shape, generator=g) > 0.3)
    vmask = (torch.rand(vocab, generator=g) > 0.2).float() if with_vocab else None
    return (
        None if tmask is None else tmask.to(device),
        None if vmask is None else vmask.to(device),
    )


def loss_and_grad(fn, logits, upstream_seed=5, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, **kw)
    g = torch.randn(loss.shape, generator=seeded(upstream_seed)).to(loss.device)
    (loss * g).sum().backward()
    return loss.detach(), x.grad


def oracle(logits, ref_logits, **kw):
    """The reference in float64 on the same (exactly upcast) inputs."""
    return loss_and_grad(
        lambda x, **k: ref.masked_kl(x, ref_logits.double(), **k), logits.double(), **kw
    )


def check_backend(
    backend,
    device,
    shape,
    direction,
    mask_kind,
    with_vocab,
    reduction="none",
    temperature=1.0,
    seed=0,
):
    logits, ref_logits = make_inputs(shape, seed, device=device)
    tmask, vmask = make_masks(mask_kind, with_vocab, shape[:-1], shape[-1], seed + 1, device)
    kw = {
        "token_mask": tmask,
        "vocab_mask": vmask,
        "direction": direction,
        "reduction": reduction,
        "temperature": temperature,
    }
    loss, grad = loss_and_grad(
        lambda x, **k: masked_kl(x, ref_logits, backend=backend, **k), logits, **kw
    )
    want_loss, want_grad = oracle(logits, ref_logits, **kw)
    assert loss.dtype == torch.float32 and loss.shape == want_loss.shape
    assert_allclose("loss", loss, want_loss, rtol=1e-4, atol=2e-5)
    assert_allclose("grad", grad, want_grad, rtol=1e-3, atol=2e-6)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("masks", MASKS, ids=lambda m: f"{m[0]}-vocab{int(m[1])}")
@pytest.mark.parametrize("vocab", [3, 1000, 4099])
def test_matches_reference(backend, device, vocab, masks, direction):
    check_backend(backend, device, (5, vocab), direction, *masks, temperature=1.7)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_vocab_32003(backend, device, direction):
    if backend == "triton" and device.type == "cpu":
        pytest.skip("too slow under the Triton interpreter (V <= 4099 there)")
    check_backend(backend, device, (9, 32003), direction, "float", True)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_vocab_above_65536(backend, device, direction):
    check_backend(backend, device, (2, 70001), direction, "none", True, reduction="sum")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_3d(backend, device, reduction):
    """[B, T, V] logits with a [B, T] float token mask, every reduction."""
    check_backend(backend, device, (2, 3, 257), "forward", "float", True, reduction=reduction)
    check_backend(backend, device, (2, 3, 257), "reverse", "bool", False, reduction=reduction)


def test_mean_is_over_nonzero_mask_entries(device):
    """mean with a float token mask = sum_t m_t KL_t / #(m_t != 0), documented behaviour."""
    logits, ref_logits = make_inputs((6, 11), device=device)
    m = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.0, 0.25], device=device)
    per_token = masked_kl(logits, ref_logits, reduction="none")
    got = masked_kl(logits, ref_logits, token_mask=m, reduction="mean")
    torch.testing.assert_close(got, (m * per_token).sum() / 4)


def test_matches_kl_div(backend, device):
    logits, ref_logits = make_inputs((7, 129), device=device)
    got = masked_kl(logits, ref_logits, backend=backend)
    want = F.kl_div(
        torch.log_softmax(logits, -1),
        torch.log_softmax(ref_logits, -1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # reverse KL(p || q) is kl_div with the roles swapped
    got = masked_kl(logits, ref_logits, direction="reverse", backend=backend)
    want = F.kl_div(
        torch.log_softmax(ref_logits, -1),
        torch.log_softmax(logits, -1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_bf16(backend, device, direction):
    """bf16 in: the error against the fp64 oracle is within the oracle's own bf16 rounding."""
    logits, ref_logits = make_inputs((6, 1001), dtype=torch.bfloat16, device=device)
    tmask, vmask = make_masks("float", True, (6,), 1001, device=device)
    kw = {"token_mask": tmask, "vocab_mask": vmask, "direction": direction, "reduction": "sum"}
    loss, grad = loss_and_grad(
        lambda x, **k: masked_kl(x, ref_logits, backend=backend, **k), logits, **kw
    )
    want_loss, want_grad = oracle(logits, ref_logits, **kw)
    assert grad.dtype == torch.bfloat16
    # fp32 math on exact bf16 inputs: only fp32 rounding in the loss.
    assert_allclose("bf16 loss", loss, want_loss, rtol=1e-4, atol=1e-5)
    rounding = (want_grad.to(torch.bfloat16).double() - want_grad).abs().max()
    err = (grad.double() - want_grad).abs().max()
    assert err <= 2 * rounding + 1e-6 * want_grad.abs().max(), (err, rounding)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_all_masked(backend, device, direction):
    logits, ref_logits = make_inputs((4, 33), device=device)
    vmask = torch.ones(33, device=device)
    for reduction in ("mean", "sum"):
        loss, grad = loss_and_grad(
            lambda x, **k: masked_kl(x, ref_logits, backend=backend, **k),
            logits,
            token_mask=torch.zeros(4, dtype=torch.bool, device=device),
            vocab_mask=vmask,
            direction=direction,
            reduction=reduction,
        )
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
    # one masked row among kept rows: its gradient is exactly zero
    tmask = torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)
    _, grad = loss_and_grad(
        lambda x, **k: masked_kl(x, ref_logits, backend=backend, **k),
        logits,
        token_mask=tmask,
        direction=direction,
    )
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert bool(grad[0].abs().sum() > 0)


def test_inplace_backward(backend, device):
    logits, ref_logits = make_inputs((2, 3, 517), device=device)
    kw = {
        "vocab_mask": make_masks("none", True, (6,), 517, device=device)[1],
        "direction": "reverse",
        "reduction": "mean",
    }
    _, want = loss_and_grad(
        lambda x, **k: masked_kl(x, ref_logits, backend=backend, **k), logits, **kw
    )
    leaf = logits.clone().requires_grad_()
    buf = leaf * 1.0  # non-leaf buffer the op may overwrite
    masked_kl(buf, ref_logits, inplace_backward=True, backend=backend, **kw).backward(
        torch.randn((), generator=seeded(5))
    )
    torch.testing.assert_close(leaf.grad, want, rtol=1e-5, atol=1e-7)
    if backend != "reference":
        torch.testing.assert_close(buf.detach(), want, rtol=1e-5, atol=1e-7)


def test_properties(backend, device):
    logits, ref_logits = make_inputs((6, 301), device=device)
    for direction in DIRECTIONS:
        per_token = masked_kl(
            logits, ref_logits, direction=direction, reduction="none", backend=backend
        )
        assert bool((per_token >= -1e-6).all()), per_token.min()
        # zero at the reference, with zero gradient
        same, grad = loss_and_grad(
            lambda x, **k: masked_kl(x, ref_logits, backend=backend, **k),
            ref_logits,
            direction=direction,
            reduction="sum",
        )
        assert abs(same.item()) < 1e-5
        assert grad.abs().max().item() < 1e-6
        # adding a constant to a row of logits (either model) changes nothing
        shifted = logits.clone()
        shifted[2] += 7.5
        ref_shifted = ref_logits.clone()
        ref_shifted[4] -= 3.0
        torch.testing.assert_close(
            masked_kl(shifted, ref_shifted, direction=direction, reduction="none", backend=backend),
            per_token,
            rtol=1e-4,
            atol=2e-5,
        )
    # ref_logits never gets a gradient
    x = logits.clone().requires_grad_()
    r = ref_logits.clone().requires_grad_()
    masked_kl(x, r, backend=backend).backward()
    assert r.grad is None and x.grad is not None


def test_helpers(device):
    labels = torch.tensor([[3, -100, 5], [-100, -100, 1]], device=device)
    assert torch.equal(
        token_mask_from_labels(labels),
        torch.tensor([[True, False, True], [False, False, True]], device=device),
    )
    u = vocab_mask_from_token_ids([2, 5], 7, device)
    assert torch.equal(u, torch.tensor([1.0, 1, 0, 1, 1, 0, 1], device=device))
    with pytest.raises(ValueError, match="token_ids"):
        vocab_mask_from_token_ids([7], 7)


def test_errors(device):
    x, r = make_inputs((4, 10), device=device)
    with pytest.raises(ValueError, match="ref_logits"):
        masked_kl(x, r[:, :9])
    with pytest.raises(ValueError, match="token_mask"):
        masked_kl(x, r, token_mask=torch.ones(5, device=device))
    with pytest.raises(ValueError, match="vocab_mask"):
        masked_kl(x, r, vocab_mask=torch.ones(9, device=device))
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            masked_kl(x, r, temperature=t)
    with pytest.raises(ValueError, match="logits"):
        masked_kl(x.long(), r)
    with pytest.raises(ValueError, match="direction"):
        masked_kl(x, r, direction="sideways")
    with pytest.raises(ValueError, match="reduction"):
        masked_kl(x, r, reduction="avg")
    with pytest.raises(ValueError, match="logits"):
        masked_kl(x[0], r[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits(backend, device, bad):
    """A kept token with a NaN/+inf logit: non-finite loss and gradient; a masked-out token
    holding the same: exactly 0 loss and 0 gradient on every backend (the reference used to
    give a NaN gradient there)."""
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    ref_logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    x[0, 3] = bad
    x[2, 4] = bad
    x = x.to(device).requires_grad_(True)
    token_mask = torch.tensor([1.0, 1.0, 0.0], device=device)
    for direction in ("forward", "reverse"):
        x.grad = None
        loss = masked_kl(
            x,
            ref_logits.to(device),
            token_mask=token_mask,
            direction=direction,
            reduction="none",
            backend=backend,
        )
        loss.sum().backward()
        assert not torch.isfinite(loss[0]) and torch.isfinite(loss[1]) and loss[2] == 0
        assert not torch.isfinite(x.grad[0]).all() and torch.isfinite(x.grad[1]).all()
        assert torch.equal(x.grad[2], torch.zeros_like(x.grad[2]))
