"""Masked KL to the original model, forward+backward: eager, torch.compile, our kernels, Liger.

One group per V; inside a group every implementation runs on the same inputs (token mask
keeping ~80% of tokens, vocabulary mask zeroing 16 ids, forward direction, mean), so the
report can print ratios to eager. Liger-Kernel's KL has no masks and takes
log-probabilities, so it runs the unmasked KL on ``log_softmax`` outputs (what a Liger
user writes); it needs CUDA. ``extra_info`` holds the peak extra memory beyond the two
logit tensors and the effective bandwidth (5 passes over one logits tensor: both rows read
in the forward, both read and the gradient written in the backward).

Sizes: N = 2048 tokens on CPU (``UNLEARNOPT_BENCH_MASKED_KL_N`` overrides), V in {32000,
49152, 128256}; the 128256 case carries the ``slow`` marker (deselect with ``-m "not slow"``).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from bench.conftest import DEVICE, QUICK, peak_extra_bytes, record, seconds, synchronize
from unlearnopt.ops.masked_kl import masked_kl, vocab_mask_from_token_ids
from unlearnopt.reference.masked_kl import masked_kl as reference_masked_kl

N = int(os.environ.get("UNLEARNOPT_BENCH_MASKED_KL_N", "4096" if DEVICE.type == "cuda" else "2048"))
VOCABS = [32000] if QUICK else [32000, 49152, pytest.param(128256, marks=pytest.mark.slow)]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def eager(logits, ref_logits, token_mask, vocab_mask):
    """What a user writes without unlearnopt: the reference formula
    ``sum_t m_t sum_v u_v q_v (log q_v - log p_v) / #(m_t != 0)``."""
    return reference_masked_kl(logits, ref_logits, token_mask, vocab_mask)


@functools.cache
def compiled():
    return torch.compile(eager, dynamic=False)


def liger(logits, ref_logits, token_mask, vocab_mask):
    from liger_kernel.transformers.functional import liger_kl_div

    return liger_kl_div(
        torch.log_softmax(logits.float(), -1),
        torch.log_softmax(ref_logits.float(), -1),
        reduction="batchmean",
        log_target=True,
    )


def ours(logits, ref_logits, token_mask, vocab_mask, backend):
    return masked_kl(
        logits, ref_logits, token_mask, vocab_mask, inplace_backward=True, backend=backend
    )


IMPLS = {
    "eager": eager,
    "torch.compile": lambda *a: compiled()(*a),
    "unlearnopt": functools.partial(ours, backend="triton" if DEVICE.type == "cuda" else "native"),
    "liger": liger,
}


def available(name: str) -> str | None:
    if name == "liger":
        pytest.importorskip("liger_kernel")
        if DEVICE.type != "cuda":
            return "Liger-Kernel needs CUDA"
    if name == "unlearnopt" and DEVICE.type == "cpu":
        from unlearnopt.native import native_error

        return native_error()
    return None


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("vocab", VOCABS)
def test_fwd_bwd(benchmark, impl, vocab):
    why = available(impl)
    if why:
        pytest.skip(why)
    benchmark.group = f"masked_kl forward N={N} V={vocab} {str(DTYPE)[6:]}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    base = torch.randn(N, vocab, device=DEVICE, dtype=DTYPE, generator=g)
    ref_logits = torch.randn(N, vocab, device=DEVICE, dtype=DTYPE, generator=g)
    token_mask = torch.rand(N, device=DEVICE, generator=g) < 0.8
    vocab_mask = vocab_mask_from_token_ids(torch.arange(100, 116), vocab, DEVICE)
    fn = IMPLS[impl]

    def setup():
        # A fresh leaf each round: our in-place backward consumes the logits buffer.
        return (base.clone().requires_grad_(True),), {}

    def run(x):
        fn(x, ref_logits, token_mask, vocab_mask).backward()
        synchronize()

    x, _ = setup()
    try:
        run(x[0])  # warm-up (compiles, builds the extension)
    except Exception as exc:  # torch.compile without a working compiler toolchain
        if impl == "torch.compile":
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}")
        raise
    x, _ = setup()
    extra = peak_extra_bytes(lambda: run(x[0]))
    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    logits_bytes = base.numel() * base.element_size()
    record(
        benchmark,
        impl=impl,
        peak_extra_bytes=extra,
        peak_extra_vs_logits=round(extra / logits_bytes, 3),
        bytes_moved=5 * logits_bytes,
        effective_gb_per_s=round(5 * logits_bytes / seconds(benchmark) / 1e9, 2),
    )
