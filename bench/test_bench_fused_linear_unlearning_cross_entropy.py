"""Cross-entropy of a linear head, forward+backward: eager, torch.compile, ours, Liger.

``loss = CE(hidden @ weight.T, labels)`` with gradients for ``hidden`` and ``weight``: eager
PyTorch materialises the ``[N, V]`` logits (and their softmax and gradient); our
``fused_linear_unlearning_cross_entropy`` runs them through the token-chunk loop. One
group per (mode, V); every implementation runs on the same inputs, so the report prints
ratios to eager. ``extra_info`` holds the peak memory beyond the inputs (the gradients of
hidden and weight included: the same for every implementation) and its ratio to the
``[N, V]`` float32 logits.

Sizes: N = 2048 tokens on CPU (4096 on CUDA; ``UNLEARNOPT_BENCH_FUSED_LINEAR_N`` overrides),
H = 576 (SmolLM2-135M; ``UNLEARNOPT_BENCH_FUSED_LINEAR_H``), V in {49152, 128256}; the
128256 case carries the ``slow`` marker.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from bench.conftest import DEVICE, QUICK, peak_extra_bytes, record, synchronize
from bench.eager_token_losses import MODE_KWARGS, eager_token_loss
from unlearnopt.ops import fused_linear_unlearning_cross_entropy

N = int(
    os.environ.get("UNLEARNOPT_BENCH_FUSED_LINEAR_N", "4096" if DEVICE.type == "cuda" else "2048")
)
H = int(os.environ.get("UNLEARNOPT_BENCH_FUSED_LINEAR_H", "576"))
VOCABS = [49152] if QUICK else [49152, pytest.param(128256, marks=pytest.mark.slow)]
MODES = ["nll"] if QUICK else ["nll", "uce", "wga", "satimp", "ce_u"]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def eager(hidden, weight, labels, mode):
    """What a user writes without unlearnopt: full logits, then the loss
    (``bench.eager_token_losses``)."""
    return eager_token_loss(hidden @ weight.T, labels, mode)


@functools.cache
def compiled(mode):
    return torch.compile(functools.partial(eager, mode=mode), dynamic=False)


def liger(hidden, weight, labels, mode):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, labels)


def ours(hidden, weight, labels, mode, backend):
    return fused_linear_unlearning_cross_entropy(
        hidden, weight, labels, mode=mode, backend=backend, **MODE_KWARGS.get(mode, {})
    )


IMPLS = {
    "eager": eager,
    "torch.compile": lambda h, w, y, mode: compiled(mode)(h, w, y),
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
    benchmark.group = (
        f"fused_linear_unlearning_cross_entropy {mode} N={N} H={H} V={vocab} {str(DTYPE)[6:]}"
    )
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(N, H, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    weight = torch.randn(vocab, H, device=DEVICE, dtype=DTYPE, generator=g) / H**0.5
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (N,), device=DEVICE, generator=g)
    fn = IMPLS[impl]

    def clear():
        hidden.grad = weight.grad = None

    def run():
        fn(hidden, weight, labels, mode).backward()
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
