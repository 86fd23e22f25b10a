"""NPO's loss of a linear head, forward+backward: eager, per-token fused CE, the one-pass op.

``loss = mean_b (2 / beta) softplus(beta (lp_b - lp_ref_b))`` with ``lp_b`` the summed
log-probabilities of sequence b under ``hidden @ weight.T``, gradients for ``hidden`` and
``weight``. ``eager`` builds the ``[B, T, V]`` logits; ``per-token fused`` takes the
per-token losses of ``fused_linear_unlearning_cross_entropy(reduction="none")`` (its
backward recomputes every chunk of logits); ``unlearnopt`` is
``fused_linear_sequence_loss`` (one pass, chunks of whole sequences). Sizes as in
``test_bench_fused_linear_unlearning_cross_entropy.py`` (N tokens = 8 sequences of N / 8);
the 128256 case carries the ``slow`` marker.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, peak_extra_bytes, record, synchronize
from bench.test_bench_fused_linear_unlearning_cross_entropy import DTYPE, VOCABS, H, N
from unlearnopt.ops import fused_linear_sequence_loss, fused_linear_unlearning_cross_entropy

BATCH, BETA = 8, 0.1


def _npo(log_prob, ref_log_prob):
    """Each sequence's term of the batch mean (the batch has BATCH sequences)."""
    return (2 / BETA) * F.softplus(BETA * (log_prob - ref_log_prob)) / BATCH


def eager(hidden, weight, labels, ref_lp):
    logp = (hidden @ weight.T).float().log_softmax(-1)
    return _npo(logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(1), ref_lp).sum()


def per_token(hidden, weight, labels, ref_lp, backend):
    nll = fused_linear_unlearning_cross_entropy(
        hidden, weight, labels, reduction="none", backend=backend
    )
    return _npo(-nll.sum(1), ref_lp).sum()


def ours(hidden, weight, labels, ref_lp, backend):
    def terms(lp, rows):
        return _npo(lp, ref_lp[rows])

    return fused_linear_sequence_loss(hidden, weight, labels, terms, backend=backend)


BACKEND = "triton" if DEVICE.type == "cuda" else "native"
IMPLS = {
    "eager": eager,
    "per-token fused": functools.partial(per_token, backend=BACKEND),
    "unlearnopt": functools.partial(ours, backend=BACKEND),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("vocab", VOCABS)
def test_fwd_bwd(benchmark, impl, vocab):
    if impl != "eager" and DEVICE.type == "cpu":
        from unlearnopt.native import native_error

        if native_error():
            pytest.skip(native_error())
    benchmark.group = f"fused_linear_sequence_loss npo N={N} H={H} V={vocab} {str(DTYPE)[6:]}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    seq = N // BATCH
    hidden = torch.randn(BATCH, seq, H, device=DEVICE, dtype=DTYPE, generator=g)
    hidden.requires_grad_()
    weight = torch.randn(vocab, H, device=DEVICE, dtype=DTYPE, generator=g) / H**0.5
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (BATCH, seq), device=DEVICE, generator=g)
    # The reference near the model (as at the start of unlearning): a log-ratio far from 0
    # drives NPO's weight sigmoid(beta * ratio) into subnormal floats, which the CPU computes
    # slowly in every implementation, and measures that instead of the loss.
    with torch.no_grad():
        logp = (hidden @ weight.T).float().log_softmax(-1)
        lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(1)
        del logp
    ref_lp = lp + torch.randn(BATCH, device=DEVICE, generator=g) / BETA
    fn = IMPLS[impl]

    def clear():
        hidden.grad = weight.grad = None

    def run():
        fn(hidden, weight, labels, ref_lp).backward()
        synchronize()

    run()  # warm-up (builds the extension)
    clear()
    extra = peak_extra_bytes(run)
    benchmark.pedantic(run, setup=clear, rounds=3, iterations=1)
    record(
        benchmark,
        impl=impl,
        peak_extra_bytes=extra,
        peak_extra_vs_logits=round(extra / (N * vocab * 4), 3),
    )
