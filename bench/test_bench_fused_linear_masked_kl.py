"""Masked KL of a linear head to the original model's, forward+backward: eager,
torch.compile, ours.

``loss = masked_kl(hidden @ weight.T, ref_hidden @ ref_weight.T)`` (forward direction, token
mask keeping ~80% of tokens, vocabulary mask zeroing 16 ids, mean) with gradients for
``hidden`` and ``weight``: eager PyTorch materialises both ``[N, V]`` logits and their
log-softmax; our ``fused_linear_masked_kl`` runs them through the token-chunk loop. One
group per V; every implementation runs on the same inputs, so the report prints ratios to
eager. ``extra_info`` holds the peak memory beyond the inputs (the gradients of hidden and
weight included: the same for every implementation) and its ratio to one ``[N, V]``
float32 logits tensor. Liger-Kernel has no masked KL of a linear head: not compared.

``loss="undial"``: UNDIAL's target, the reference's label logit lowered by gamma = 10 and the
cross-entropy ``-sum_v u_v q_v log p_v`` reported (``ref_labels=``, ``ref_label_shift=``,
``cross_entropy=True``); eager lowers a copy of the reference logits.

Sizes as in ``test_bench_fused_linear_unlearning_cross_entropy.py`` (same environment
variables); the 128256 case carries the ``slow`` marker.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.conftest import DEVICE, peak_extra_bytes, record, synchronize
from bench.test_bench_fused_linear_unlearning_cross_entropy import DTYPE, VOCABS, H, N
from unlearnopt.ops import fused_linear_masked_kl, vocab_mask_from_token_ids
from unlearnopt.reference.masked_kl import masked_kl as reference_masked_kl

GAMMA = 10.0


def eager(hidden, weight, ref_hidden, ref_weight, token_mask, vocab_mask, labels=None):
    """What a user writes without unlearnopt: both logits whole, then
    ``sum_t m_t sum_v u_v q_v (log q_v - log p_v) / #(m_t != 0)``; with ``labels`` (UNDIAL)
    q = softmax(ref_logits - gamma e_y) and the cross-entropy ``-sum_v u_v q_v log p_v``."""
    logits = hidden @ weight.T
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_weight.T
    if labels is None:
        return reference_masked_kl(logits, ref_logits, token_mask, vocab_mask)
    with torch.no_grad():
        ref_logits[torch.arange(len(labels)), labels] -= GAMMA
        target = ref_logits.float().softmax(-1) * vocab_mask
    per_token = -(target * logits.float().log_softmax(-1)).sum(-1)
    m = token_mask.float()
    return (m * per_token).sum() / (m != 0).sum()


@functools.cache
def compiled():
    return torch.compile(eager, dynamic=False)


def ours(hidden, weight, ref_hidden, ref_weight, token_mask, vocab_mask, labels=None, *, backend):
    undial = (
        {} if labels is None else dict(ref_labels=labels, ref_label_shift=GAMMA, cross_entropy=True)
    )
    return fused_linear_masked_kl(
        hidden,
        weight,
        ref_hidden,
        ref_weight,
        token_mask=token_mask,
        vocab_mask=vocab_mask,
        backend=backend,
        **undial,
    )


IMPLS = {
    "eager": eager,
    "torch.compile": lambda *a: compiled()(*a),
    "unlearnopt": functools.partial(ours, backend="triton" if DEVICE.type == "cuda" else "native"),
}


def available(name: str) -> str | None:
    if name == "unlearnopt" and DEVICE.type == "cpu":
        from unlearnopt.native import native_error

        return native_error()
    return None


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("loss", ["kl", "undial"])
def test_fwd_bwd(benchmark, impl, vocab, loss):
    why = available(impl)
    if why:
        pytest.skip(why)
    target = "forward" if loss == "kl" else "undial"
    benchmark.group = f"fused_linear_masked_kl {target} N={N} H={H} V={vocab} {str(DTYPE)[6:]}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(N, H, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    weight = torch.randn(vocab, H, device=DEVICE, dtype=DTYPE, generator=g) / H**0.5
    weight.requires_grad_()
    ref_hidden = hidden.detach() + 0.1 * torch.randn(N, H, device=DEVICE, dtype=DTYPE, generator=g)
    ref_weight = weight.detach() + 0.01 * torch.randn(
        vocab, H, device=DEVICE, dtype=DTYPE, generator=g
    )
    token_mask = torch.rand(N, device=DEVICE, generator=g) < 0.8
    vocab_mask = vocab_mask_from_token_ids(torch.arange(100, 116), vocab, DEVICE)
    labels = None
    if loss == "undial":
        labels = torch.randint(0, vocab, (N,), device=DEVICE, generator=g)
    fn = IMPLS[impl]

    def clear():
        hidden.grad = weight.grad = None

    def run():
        fn(hidden, weight, ref_hidden, ref_weight, token_mask, vocab_mask, labels).backward()
        synchronize()

    try:
        run()  # warm-up (compiles, builds the extension)
    except Exception as exc:  # torch.compile without a working compiler toolchain
        if impl == "torch.compile":
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}")
        raise
    clear()
    extra = peak_extra_bytes(run)
    benchmark.pedantic(run, setup=clear, rounds=3, iterations=1)
    logits_bytes = N * vocab * 4
    record(
        benchmark,
        impl=impl,
        peak_extra_bytes=extra,
        peak_extra_vs_logits=round(extra / logits_bytes, 3),
    )
