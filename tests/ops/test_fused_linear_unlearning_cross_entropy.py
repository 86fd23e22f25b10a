"""fused_linear_unlearning_cross_entropy: every backend against the reference."""

from __future__ import annotations

import pytest
import torch

from tests.assertions import assert_within
from tests.conftest import DEVICE, seeded
from tests.ops.ce_bounds import oracle_bound
from unlearnopt.ops import fused_linear_unlearning_cross_entropy as fused
from unlearnopt.ops._fused_linear import default_chunk_size
from unlearnopt.reference.unlearning_cross_entropy import (
    fused_linear_unlearning_cross_entropy as reference,
)

MODES = ["nll", "ga", "uce", "wga", "satimp", "ce_u"]
# The exponents the new modes run with (satimp: its paper's 5 and 1; wga: not the default).
MODE_KWARGS = {"wga": dict(beta1=2.0), "satimp": dict(beta1=5.0, beta2=1.0)}


def make(n, hidden, vocab, dtype, bias, seed=0):
    g = seeded(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 3).to(dtype)
    b = (torch.randn(vocab, generator=g)).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    up = torch.rand(n, generator=g) + 0.5
    return [t.to(DEVICE) if t is not None else None for t in (h, w, b, labels, up)]


def run(fn, h, w, b, labels, up, reduction, requires=(True, True, True), **kw):
    leaves = [
        t.detach().clone().requires_grad_(r) if t is not None else None
        for t, r in zip((h, w, b), requires)
    ]
    loss = fn(leaves[0], leaves[1], labels, leaves[2], reduction=reduction, **kw)
    weight = up.view(loss.shape) if reduction == "none" else up[0]
    (loss * weight).sum().backward()
    grads = [t.grad if t is not None and t.requires_grad else None for t in leaves]
    return loss.detach().float().reshape(-1), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(backend, mode, reduction, dtype):
    n, hidden, vocab = (13, 24, 517)
    h, w, b, labels, up = make(n, hidden, vocab, dtype, bias=True)
    kw = dict(mode=mode, **MODE_KWARGS.get(mode, {}))
    out = run(fused, h, w, b, labels, up, reduction, backend=backend, chunk_size=4, **kw)
    low = run(reference, h, w, b, labels, up, reduction, **kw)
    oracle = run(
        reference, h.double(), w.double(), b.double(), labels, up.double(), reduction, **kw
    )
    assert_within("loss", out[0], oracle[0], oracle_bound(low[0], oracle[0], out[0].dtype))
    from unlearnopt.kernels import interpreting

    # The Triton interpreter truncates fp32 -> bf16 stores (compiled Triton rounds to
    # nearest): a biased error that adds up linearly in the hidden/weight contractions.
    factor = 8 if backend == "triton" and interpreting() and dtype != torch.float32 else 2
    for name, got, lo, exact in zip(("hidden", "weight", "bias"), out[1], low[1], oracle[1]):
        # The chunked contraction sums in another order than one big matmul: allow the
        # low-precision reference error relative to the gradient's scale, not per element.
        # The hidden gradient is formed in the forward (rounded to its dtype) and rounded
        # once more when the backward scales it by the upstream gradient: half a unit in the
        # last place at the gradient's scale.
        err = (got.double() - exact).abs().max()
        ref_err = (lo.double() - exact).abs().max()
        scale = exact.abs().max()
        second_rounding = torch.finfo(dtype).eps / 2 if name == "hidden" else 0.0
        assert err <= factor * ref_err + (1e-5 + second_rounding) * scale + 1e-12, (
            f"grad {name}: {err:.3e} vs reference {ref_err:.3e}"
        )
        assert got.dtype == dtype


@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, True), (False, True, False)]
)
def test_partial_requires_grad_and_no_bias(backend, requires):
    h, w, _, labels, up = make(9, 8, 101, torch.float32, bias=False)
    got = run(fused, h, w, None, labels, up, "mean", requires, mode="uce", backend=backend)
    want = run(reference, h, w, None, labels, up, "mean", requires, mode="uce")
    torch.testing.assert_close(got[0], want[0])
    for a, e in zip(got[1], want[1]):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_three_d_input_and_default_chunks(backend):
    h, w, b, labels, up = make(12, 16, 300, torch.float32, bias=True, seed=2)
    got = run(
        fused, h.view(3, 4, 16), w, b, labels.view(3, 4), up, "none", mode="ga", backend=backend
    )
    want = run(reference, h.view(3, 4, 16), w, b, labels.view(3, 4), up, "none", mode="ga")
    torch.testing.assert_close(got[0], want[0])
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_all_ignored_gives_zero(backend):
    h, w, b, labels, up = make(5, 8, 50, torch.float32, bias=True)
    labels[:] = -100
    loss, grads = run(fused, h, w, b, labels, up, "mean", mode="uce", backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("mode", MODES)
def test_nan_hidden_state_gives_non_finite_loss(backend, mode):
    """A NaN hidden state of a kept token: the loss (and its gradients) are not finite on
    every backend (native uce used to return a finite loss)."""
    h, w, b, labels, up = make(6, 8, 50, torch.float32, bias=False)
    labels[1] = 3
    h[1, 0] = float("nan")
    for reduction in ("mean", "none"):
        loss, grads = run(fused, h, w, b, labels, up, reduction, mode=mode, backend=backend)
        assert not torch.isfinite(loss).all()
        assert not torch.isfinite(grads[0]).all() and not torch.isfinite(grads[1]).all()


def test_default_chunk_holds_about_2_to_the_24_logits():
    assert default_chunk_size(4096, 128256) == 130
    assert default_chunk_size(2048, 49152) == 341
    assert default_chunk_size(4096, 256000) == 128  # at least 128 rows
    assert default_chunk_size(7, 100) == 7
    assert default_chunk_size(0, 100) == 1


@pytest.mark.parametrize(
    "change,match",
    [
        (
            dict(weight=torch.randn(50, 9)),
            r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 8",
        ),
        (dict(bias=torch.randn(49)), r"bias must have shape \(50,\)"),
        (dict(labels=torch.tensor([0, 50, 1])), r"labels must lie in \[0, 50\)"),
        (dict(labels=torch.tensor([0, 1])), r"labels has shape \(2,\)"),
        (dict(chunk_size=0), r"chunk_size must be a positive int"),
        (dict(mode="x"), r"mode must be one of"),
        (dict(mode="satimp", beta2=-0.5), r"beta2 must be a finite number >= 0"),
    ],
)
def test_bad_input(change, match):
    args = dict(
        hidden=torch.randn(3, 8),
        weight=torch.randn(50, 8),
        labels=torch.tensor([0, 1, 2]),
        bias=None,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fused(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize("mode", ["wga", "satimp", "ce_u"])
def test_new_modes_equal_the_unfused_op(backend, mode):
    """The chunked op equals ``unlearning_cross_entropy(F.linear(h, w, b))`` on the same
    backend, loss and gradients (``none`` with per-token upstream: the backward recomputes
    the chunks from the saved (lse, 1 - p_y, h) statistics)."""
    from unlearnopt.ops import unlearning_cross_entropy

    h, w, b, labels, up = make(11, 16, 203, torch.float32, bias=True, seed=6)
    kw = dict(mode=mode, **MODE_KWARGS.get(mode, {}))

    def unfused(hh, ww, yy, bb, **k):
        return unlearning_cross_entropy(torch.nn.functional.linear(hh, ww, bb), yy, **k)

    for reduction in ("mean", "none"):
        got = run(fused, h, w, b, labels, up, reduction, backend=backend, chunk_size=3, **kw)
        want = run(unfused, h, w, b, labels, up, reduction, backend=backend, **kw)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
        for a, e in zip(got[1], want[1]):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
