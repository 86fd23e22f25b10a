"""Unlearning cross-entropy, forward+backward: eager PyTorch, torch.compile, our kernels, Liger.

One group per (mode, V); inside a group every implementation runs on the same inputs, so
the report can print ratios to eager. ``extra_info`` holds the peak extra memory (beyond
the logits themselves) and the effective bandwidth (3 passes over the logits: read in the
forward, read + write in the backward).
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.conftest import DEVICE, QUICK, peak_extra_bytes, record, seconds, synchronize
from bench.eager_token_losses import MODE_KWARGS, eager_token_loss
from unlearnopt.ops import unlearning_cross_entropy

N = 4096 if DEVICE.type == "cuda" else 2048
VOCABS = [32000] if QUICK else [32000, 49152, 128256]
MODES = ["nll", "uce", "wga", "satimp", "ce_u"] if not QUICK else ["nll"]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def eager(logits, labels, mode):
    """What a user writes without unlearnopt (``bench.eager_token_losses``)."""
    return eager_token_loss(logits, labels, mode)


@functools.cache
def compiled(mode):
    return torch.compile(functools.partial(eager, mode=mode), dynamic=False)


def liger(logits, labels, mode):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return liger_cross_entropy(logits, labels)


def ours(logits, labels, mode, backend):
    return unlearning_cross_entropy(
        logits, labels, mode, inplace_backward=True, backend=backend, **MODE_KWARGS.get(mode, {})
    )


IMPLS = {
    "eager": eager,
    "torch.compile": lambda x, y, mode: compiled(mode)(x, y),
    "unlearnopt": functools.partial(ours, backend="triton" if DEVICE.type == "cuda" else "native"),
    "liger": liger,
}


def available(name: str, mode: str) -> str | None:
    if name == "liger":
        if mode != "nll":
            return "Liger-Kernel has no unlearning modes"
        if DEVICE.type != "cuda":
            return "Liger-Kernel needs CUDA"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    if name == "unlearnopt" and DEVICE.type == "cpu":
        from unlearnopt.native import native_error

        return native_error()
    return None


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("mode", MODES)
def test_fwd_bwd(benchmark, impl, vocab, mode):
    why = available(impl, mode)
    if why:
        pytest.skip(why)
    benchmark.group = f"unlearning_cross_entropy {mode} N={N} V={vocab} {str(DTYPE)[6:]}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    base = torch.randn(N, vocab, device=DEVICE, dtype=DTYPE, generator=g)
    labels = torch.randint(0, vocab, (N,), device=DEVICE, generator=g)
    fn = IMPLS[impl]

    def setup():
        # A fresh leaf each round: our in-place backward consumes the logits buffer.
        return (base.clone().requires_grad_(True),), {}

    def run(x):
        fn(x, labels, mode).backward()
        synchronize()

    x, _ = setup()
    run(x[0])  # warm-up (compiles, builds the extension)
    x, _ = setup()
    extra = peak_extra_bytes(lambda: run(x[0]))
    benchmark.pedantic(run, setup=setup, rounds=3 if vocab > 100_000 else 5, iterations=1)
    logits_bytes = base.numel() * base.element_size()
    record(
        benchmark,
        impl=impl,
        peak_extra_bytes=extra,
        peak_extra_vs_logits=round(extra / logits_bytes, 3),
        bytes_moved=3 * logits_bytes,
        effective_gb_per_s=round(3 * logits_bytes / seconds(benchmark) / 1e9, 2),
    )
