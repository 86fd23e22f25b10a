"""Gradient Gram matrices over the parameter tensors of SmolLM2-135M.

Implementations (one group per K, same gradients for all):

* ``loop``: a Python loop of ``torch.dot`` per tensor and pair (what users write);
* ``foreach``: ``torch._foreach_mul`` per pair of objectives, then a sum per tensor;
* ``cat_matmul``: concatenate every objective's gradients and one ``X @ X.T`` (total only,
  no per-tensor Gram; one huge float32 reduction);
* ``unlearnopt``: ``grad_gram`` (native on CPU, Triton on CUDA).

Shapes come from the model config (no model is built). ``extra_info`` holds the effective
bandwidth (every gradient element read once: K * numel * itemsize bytes per call), its
fraction of the device's copy bandwidth, and the peak extra memory.
``UNLEARNOPT_BENCH_QUICK=1`` uses 2 layers and a 4096-token vocabulary.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.conftest import (
    DEVICE,
    QUICK,
    peak_bandwidth_bytes_per_s,
    peak_extra_bytes,
    record,
    seconds,
    synchronize,
)
from unlearnopt.ops.grad_gram import grad_gram

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
KS = [2, 3]


def smollm2_shapes(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
) -> list[tuple[int, ...]]:
    """Trainable parameter shapes of a Llama model with this config, in module order."""
    head_dim = hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    shapes = [(vocab_size, hidden_size)]
    for _ in range(num_hidden_layers):
        shapes += [
            (hidden_size, hidden_size),
            (kv, hidden_size),
            (kv, hidden_size),
            (hidden_size, hidden_size),
            (intermediate_size, hidden_size),
            (intermediate_size, hidden_size),
            (hidden_size, intermediate_size),
            (hidden_size,),
            (hidden_size,),
        ]
    shapes.append((hidden_size,))
    if not tie_word_embeddings:
        shapes.append((vocab_size, hidden_size))
    return shapes


SHAPES = smollm2_shapes(num_hidden_layers=2, vocab_size=4096) if QUICK else smollm2_shapes()


def loop(grads):
    k = len(grads)
    out = []
    for p in range(len(grads[0])):
        rows = [g[p].reshape(-1) for g in grads]
        out.append([torch.dot(rows[i], rows[j]) for i in range(k) for j in range(i, k)])
    return out


def foreach(grads):
    k = len(grads)
    out = []
    for i in range(k):
        for j in range(i, k):
            out.append([t.sum() for t in torch._foreach_mul(grads[i], grads[j])])
    return out


def cat_matmul(grads):
    x = torch.stack([torch.cat([t.reshape(-1) for t in seq]) for seq in grads])
    return x @ x.T


def ours(grads):
    return grad_gram(grads, backend="triton" if DEVICE.type == "cuda" else "native")


IMPLS = {"loop": loop, "foreach": foreach, "cat_matmul": cat_matmul, "unlearnopt": ours}
# The slow baselines (seconds per call on CPU at full size) get fewer rounds.
ROUNDS = {"loop": 5, "foreach": 3, "cat_matmul": 3, "unlearnopt": 7}


@functools.cache
def gradients(k: int) -> list[list[torch.Tensor]]:
    g = torch.Generator(device=DEVICE).manual_seed(k)
    return [
        [torch.randn(s, device=DEVICE, dtype=DTYPE, generator=g) for s in SHAPES] for _ in range(k)
    ]


@functools.cache
def copy_bandwidth() -> float:
    return peak_bandwidth_bytes_per_s()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("k", KS)
def test_grad_gram(benchmark, impl, k):
    if impl == "unlearnopt" and DEVICE.type == "cpu":
        from unlearnopt.native import native_error

        if native_error() is not None:
            pytest.skip(native_error())
    grads = gradients(k)
    numel = sum(t.numel() for t in grads[0])
    benchmark.group = f"grad_gram K={k} P={len(SHAPES)} numel={numel / 1e6:.1f}M {str(DTYPE)[6:]}"
    fn = IMPLS[impl]

    def run():
        fn(grads)
        synchronize()

    if impl == "unlearnopt":
        run()  # warm-up: builds/loads the extension
    extra = peak_extra_bytes(run)  # also the warm-up of the baselines (seconds per call)
    benchmark.pedantic(run, rounds=ROUNDS[impl], iterations=1, warmup_rounds=0)
    read = k * numel * grads[0][0].element_size()
    gbs = read / seconds(benchmark) / 1e9
    record(
        benchmark,
        impl=impl,
        k=k,
        tensors=len(SHAPES),
        numel=numel,
        peak_extra_bytes=extra,
        bytes_read=read,
        effective_gb_per_s=round(gbs, 2),
        fraction_of_copy_bandwidth=round(gbs * 1e9 / copy_bandwidth(), 3),
    )
