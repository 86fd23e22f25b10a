"""fused_linear_sequence_loss: every backend against the plain-PyTorch formula.

The expected values are written here: full logits, per-sequence log-probabilities summed by
hand, an NPO-like per-sequence term, autograd for the gradients.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.conftest import DEVICE, seeded
from unlearnopt.ops import fused_linear_sequence_loss as fused
from unlearnopt.ops.fused_linear_sequence_loss import sequences_per_chunk

# The module (its name is also the op's, which ``unlearnopt.ops`` exports).
mod = importlib.import_module("unlearnopt.ops.fused_linear_sequence_loss")


def make(batch, seq, hidden, vocab, dtype=torch.float32, bias=True, seed=0):
    g = seeded(seed)
    h = torch.randn(batch, seq, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 3).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.3] = -100
    ref_lp = -torch.rand(batch, generator=g) * 5 * seq
    return [t.to(DEVICE) if t is not None else None for t in (h, w, b, labels, ref_lp)]


def npo_terms(ref_lp, beta=0.5):
    """NPO's per-sequence term (2/beta) softplus(beta (lp - ref)) / B."""

    def terms(lp, rows):
        return (2 / beta) * torch.nn.functional.softplus(beta * (lp - ref_lp[rows])) / len(ref_lp)

    return terms


def by_hand(h, w, b, labels, terms):
    logits = torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double())
    logp = logits.log_softmax(-1)
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(keep, picked, torch.zeros_like(picked)).sum(dim=1)
    return terms(lp, slice(0, labels.shape[0])).sum()


def loss_and_grads(fn, h, w, b, labels, upstream=1.7, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (h, w, b)]
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    (loss * upstream).backward()
    return loss.detach().double(), [None if t is None else t.grad.double() for t in leaves]


def expected(h, w, b, labels, ref_lp, upstream=1.7):
    def fn(hh, ww, ll, bias):
        return by_hand(hh, ww, bias, ll, npo_terms(ref_lp.double()))

    return loss_and_grads(
        fn, h.double(), w.double(), None if b is None else b.double(), labels, upstream
    )


def assert_matches(got, want, rtol=2e-5):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=1e-6)
    for name, g, e in zip(("hidden", "weight", "bias"), got[1], want[1]):
        assert (g is None) == (e is None), name
        if g is not None:
            scale = e.abs().max().clamp(min=1e-30)
            assert (g - e).abs().max() <= rtol * 10 * scale + 1e-9, name


@pytest.mark.parametrize("bias", [True, False])
def test_one_pass_matches_formula(backend, bias):
    h, w, b, labels, ref_lp = make(5, 7, 12, 301, bias=bias)
    got = loss_and_grads(fused, h, w, b, labels, sequence_loss=npo_terms(ref_lp), backend=backend)
    assert_matches(got, expected(h, w, b, labels, ref_lp))


def test_several_chunks_of_whole_sequences(backend, monkeypatch):
    """Chunks of 2 sequences (5 sequences: 2 + 2 + 1), each chunk's slope computed alone."""
    import unlearnopt.ops._fused_linear as loop

    monkeypatch.setattr(mod, "default_chunk_size", lambda n, v: 14)
    assert mod.sequences_per_chunk(5, 7, 301) == 2
    seen = []
    real = loop.chunk_loop

    def spy(hidden, weight, bias, chunk, step, want):
        seen.append(chunk)
        return real(hidden, weight, bias, chunk, step, want)

    monkeypatch.setattr(mod, "chunk_loop", spy)
    h, w, b, labels, ref_lp = make(5, 7, 12, 301, seed=3)
    got = loss_and_grads(fused, h, w, b, labels, sequence_loss=npo_terms(ref_lp), backend=backend)
    assert seen == ([] if backend == "reference" else [14])
    assert_matches(got, expected(h, w, b, labels, ref_lp))


def test_two_passes_for_sequences_longer_than_a_chunk(backend, monkeypatch):
    monkeypatch.setattr(mod, "MAX_CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(mod, "default_chunk_size", lambda n, v: 3)  # chunks cut sequences
    assert mod.sequences_per_chunk(4, 6, 301) == 0
    h, w, b, labels, ref_lp = make(4, 6, 12, 301, seed=4)
    got = loss_and_grads(fused, h, w, b, labels, sequence_loss=npo_terms(ref_lp), backend=backend)
    assert_matches(got, expected(h, w, b, labels, ref_lp))


def test_bf16_close_to_float64(backend):
    h, w, b, labels, ref_lp = make(3, 6, 16, 257, dtype=torch.bfloat16, seed=5)
    got = loss_and_grads(fused, h, w, b, labels, sequence_loss=npo_terms(ref_lp), backend=backend)
    want = expected(h, w, b, labels, ref_lp)
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-4)
    for g, e in zip(got[1], want[1]):
        assert (g - e).abs().max() <= 3e-2 * e.abs().max()


def test_fully_ignored_sequence_and_no_grad(backend):
    h, w, b, labels, ref_lp = make(3, 5, 8, 97, seed=6)
    labels[1] = -100
    got = loss_and_grads(fused, h, w, b, labels, sequence_loss=npo_terms(ref_lp), backend=backend)
    want = expected(h, w, b, labels, ref_lp)
    assert_matches(got, want)
    assert torch.equal(got[1][0][1], torch.zeros_like(got[1][0][1]))  # no gradient to it
    with torch.no_grad():
        value = fused(h, w, labels, npo_terms(ref_lp), b, backend=backend)
    torch.testing.assert_close(value.double(), want[0], rtol=2e-5, atol=1e-6)


def test_float64_runs_the_reference_and_differentiates_twice():
    h, w, b, labels, ref_lp = make(2, 4, 6, 31, dtype=torch.float64, seed=7)
    h.requires_grad_(True)
    loss = fused(h, w, labels, npo_terms(ref_lp.double()), b, backend="reference")
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    g.sum().backward()
    assert h.grad is not None


def test_sequences_per_chunk():
    assert sequences_per_chunk(8, 256, 128256) == 1  # 32.8 M logits: one sequence
    assert sequences_per_chunk(8, 64, 2048) == 8
    assert sequences_per_chunk(8, 4096, 128256) == 0  # 525 M logits: two passes
    assert sequences_per_chunk(3, 10, 100) == 3


def test_backward_twice_raises():
    h, w, b, labels, ref_lp = make(2, 4, 6, 31)
    h.requires_grad_(True)
    loss = fused(h, w, labels, npo_terms(ref_lp), b, backend="native")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(sequence_loss=lambda lp, rows: lp.sum()), ValueError, r"one term per sequence"),
        (dict(sequence_loss=3), TypeError, r"sequence_loss must be a callable"),
        (dict(hidden=torch.randn(6, 8)), ValueError, r"hidden must be \[B, T, H\]"),
        (dict(weight=torch.randn(50, 9)), ValueError, r"weight must be \[V, H\]"),
        (dict(labels=torch.tensor([[0, 50, 1]] * 2)), ValueError, r"labels must lie in"),
    ],
)
def test_bad_input(change, error, match):
    args = dict(
        hidden=torch.randn(2, 3, 8),
        weight=torch.randn(50, 8),
        labels=torch.tensor([[0, 1, 2], [3, 4, -100]]),
        sequence_loss=lambda lp, rows: lp * 0.1,
    )
    args.update(change)
    with pytest.raises(error, match=match):
        fused(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args, backend="native")


def test_matches_the_reference_op(backend):
    """The public op against ``unlearnopt.reference``'s, value and gradients."""
    from unlearnopt.reference.unlearning_cross_entropy import fused_linear_sequence_loss as ref

    h, w, b, labels, ref_lp = make(4, 6, 10, 211, seed=8)
    terms = npo_terms(ref_lp)
    got = loss_and_grads(fused, h, w, b, labels, sequence_loss=terms, backend=backend)
    want = loss_and_grads(ref, h, w, b, labels, sequence_loss=terms)
    assert_matches(got, want)
