"""grad_gram: every backend against the float64 reference, properties, cosines, errors.

Tolerances. Integer-valued gradients (exact in bf16/fp16/fp32, products and sums exact in
float32 while below 2^24) must match the float64 reference EXACTLY, so a missed or doubled
element anywhere fails. For random-normal gradients the bound is the float32 summation
bound: no backend adds more than ``M = 256`` products in one float32 running sum (native:
a block of <= 2048 elements over 8 lanes, then float64; Triton: CHUNK / BLOCK <= 256 terms
per register slot, then a tree over the block, then float64), so
``|err_ij| <= (M + 1) eps32 sum|x_i x_j| <= (M + 1) eps32 |x_i| |x_j|`` (the +1: the final
rounding to float32). Low-precision inputs are compared with the float64 Gram of the SAME
low-precision values, which is what the op promises (float32 accumulation, no rounding of
products).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.assertions import assert_within
from tests.conftest import seeded
from unlearnopt.ops.grad_gram import GradGram, grad_cosine, grad_gram, gram_to_cosine
from unlearnopt.reference.grad_gram import grad_gram as reference_gram

# Awkward sizes: 1, 7, 1000 (as 10 x 100), 4097, a zero-size tensor (a zero row; allowed),
# and a non-square matrix. Small on purpose: the Triton interpreter runs these on CPU.
SHAPES = [(1,), (7,), (10, 100), (4097,), (0, 3), (3, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
M_TERMS = 256


def make_grads(k: int, shapes=SHAPES, dtype=torch.float32, seed: int = 0, integer=False):
    gen = seeded(seed)
    out = []
    for _ in range(k):
        seq = []
        for s in shapes:
            x = (
                torch.randint(-4, 5, s, generator=gen).float()
                if integer
                else torch.randn(s, generator=gen)
            )
            seq.append(x.to(dtype))
        out.append(seq)
    return out


def oracle(grads) -> GradGram:
    return reference_gram(grads, out_dtype=torch.float64)


def assert_close_to_oracle(got: GradGram, grads) -> None:
    """Each entry within (M + 1) fp32 roundings of the product of the two gradient norms."""
    want = oracle(grads)
    norms = torch.diagonal(want.per_tensor, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    bound = (M_TERMS + 1) * torch.finfo(torch.float32).eps * norms[:, :, None] * norms[:, None, :]
    assert_within("per_tensor", got.per_tensor, want.per_tensor, bound + 1e-30)
    total_bound = bound.sum(0) + torch.finfo(torch.float32).eps * want.total.abs()
    assert_within("total", got.total, want.total, total_bound + 1e-30)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_on_integer_gradients(backend, device, k, dtype):
    grads = [[g.to(device) for g in seq] for seq in make_grads(k, dtype=dtype, integer=True)]
    got = grad_gram(grads, backend=backend)
    want = oracle(grads)
    assert got.per_tensor.dtype == torch.float32 and got.total.dtype == torch.float32
    assert got.per_tensor.shape == (len(SHAPES), k, k) and got.total.shape == (k, k)
    assert torch.equal(got.per_tensor.double().cpu(), want.per_tensor.cpu())
    assert torch.equal(got.total.double().cpu(), want.total.cpu())


@pytest.mark.parametrize("k", [2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_gradients_within_float32_bound(backend, device, k, dtype):
    grads = [[g.to(device) for g in seq] for seq in make_grads(k, dtype=dtype, seed=k)]
    assert_close_to_oracle(grad_gram(grads, backend=backend), grads)


def test_large_tensor_many_chunks(backend, device):
    # 100003 elements: several Triton chunks and native chunks/blocks, odd tail.
    grads = make_grads(2, shapes=[(100003,), (576,)], seed=3)
    grads = [[g.to(device) for g in seq] for seq in grads]
    assert_close_to_oracle(grad_gram(grads, backend=backend), grads)
    ints = [
        [g.to(device) for g in seq] for seq in make_grads(2, shapes=[(100003,), (5,)], integer=True)
    ]
    assert torch.equal(
        grad_gram(ints, backend=backend).per_tensor.double().cpu(), oracle(ints).per_tensor.cpu()
    )


def test_many_objectives(backend, device):
    # 17 objectives: above the Triton kernel's 16, which refuses them when named (the
    # fallback of ``auto`` is tested in tests/ops/test_backend.py).
    grads = [[g.to(device) for g in seq] for seq in make_grads(17, shapes=[(5,)], integer=True)]
    if backend == "triton":
        with pytest.raises(ValueError, match="cannot run more than 16 objectives"):
            grad_gram(grads, backend=backend)
        return
    assert torch.equal(
        grad_gram(grads, backend=backend).per_tensor.double().cpu(), oracle(grads).per_tensor.cpu()
    )


def test_mixed_dtypes_across_tensors(backend, device):
    # Tensor p may have its own dtype (e.g. fp32 norms beside bf16 weights).
    grads = make_grads(3, shapes=[(33,), (65,)], integer=True)
    for seq in grads:
        seq[1] = seq[1].bfloat16()
    grads = [[g.to(device) for g in seq] for seq in grads]
    assert torch.equal(
        grad_gram(grads, backend=backend).per_tensor.double().cpu(), oracle(grads).per_tensor.cpu()
    )


def test_none_gradients_count_as_zeros(backend, device):
    grads = [[g.to(device) for g in seq] for seq in make_grads(3, integer=True)]
    grads[1][0] = None
    grads[0][3] = None
    grads[2][3] = None
    for seq in grads:
        seq[2] = None  # nobody touches tensor 2
    got = grad_gram(grads, backend=backend)
    zeros = [
        [torch.zeros(s, device=device) if g is None else g.float() for g, s in zip(seq, SHAPES)]
        for seq in grads
    ]
    want = oracle(zeros)
    assert torch.equal(got.per_tensor.double().cpu(), want.per_tensor.cpu())
    assert bool((got.per_tensor[2] == 0).all())
    assert bool((got.per_tensor[0, 1, :] == 0).all()) and bool((got.per_tensor[0, :, 1] == 0).all())


def test_all_none_and_empty_lists(backend, device):
    got = grad_gram([[None, None], [None, None]], backend=backend)
    assert torch.equal(got.per_tensor, torch.zeros(2, 2, 2))
    assert torch.equal(got.total, torch.zeros(2, 2))
    empty = grad_gram([[], [], []], backend=backend)
    assert empty.per_tensor.shape == (0, 3, 3) and torch.equal(empty.total, torch.zeros(3, 3))


def test_non_contiguous_gradients(backend, device):
    gen = seeded(5)
    base = [torch.randint(-3, 4, (9, 14), generator=gen).float().to(device) for _ in range(3)]
    cases = [
        [b.t() for b in base],  # dense, same (transposed) strides: in place
        [base[0], base[1].t().contiguous().t(), base[2]],  # dense, different strides: copied
        [b[:, ::2] for b in base],  # not dense: copied
        [b.reshape(-1).as_strided((30, 4), (3, 1)) for b in base],  # overlapping windows
    ]
    for case in cases:
        grads = [[c, torch.ones(3, device=device)] for c in case]
        got = grad_gram(grads, backend=backend)
        assert torch.equal(got.per_tensor.double().cpu(), oracle(grads).per_tensor.cpu())


def test_symmetric_psd_and_total(backend, device):
    grads = make_grads(4, seed=7)
    # Nearly collinear and conflicting objectives: a hard case for PSD-ness in float32.
    grads[1] = [g + 1e-3 * h for g, h in zip(grads[0], grads[1])]
    grads[2] = [-g for g in grads[0]]
    grads = [[g.to(device) for g in seq] for seq in grads]
    got = grad_gram(grads, backend=backend)
    per = got.per_tensor.double().cpu()
    assert torch.equal(per, per.transpose(-1, -2))
    scale = torch.diagonal(per, dim1=-2, dim2=-1).sum(-1).clamp(min=1e-30)
    eig = torch.linalg.eigvalsh(per)
    assert bool((eig >= -1e-5 * scale[:, None]).all()), f"min eigenvalue {eig.min():.3e}"
    assert torch.allclose(got.total, got.per_tensor.sum(0), rtol=1e-6, atol=0)


def test_deterministic(backend, device):
    grads = [[g.to(device) for g in seq] for seq in make_grads(3, shapes=[(70001,), (13,)])]
    first = grad_gram(grads, backend=backend)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        second = grad_gram(grads, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first.per_tensor, second.per_tensor)
    assert torch.equal(first.total, second.total)


def test_float64_and_autograd_use_reference():
    grads = make_grads(2, dtype=torch.float64, seed=9)
    got = grad_gram(grads)
    assert got.total.dtype == torch.float64
    assert torch.equal(got.per_tensor, oracle(grads).per_tensor)
    # Gradients that require grad: the Gram is differentiable (d<g0, g1>/dg0 = g1).
    leaf = [[g.float().requires_grad_() for g in seq] for seq in make_grads(2, seed=10)]
    out = grad_gram(leaf)
    out.total[0, 1].backward()
    for p, g in enumerate(leaf[0]):
        assert torch.allclose(g.grad, leaf[1][p].detach(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# cosines
# ---------------------------------------------------------------------------------------


def test_cosine_matches_direct_and_handles_zeros():
    gen = seeded(11)
    a, b = (
        torch.randn(50, generator=gen, dtype=torch.float64),
        torch.randn(50, generator=gen, dtype=torch.float64),
    )
    zero = torch.zeros(50, dtype=torch.float64)
    x = torch.stack([a, b, zero, -2 * a])
    cos = gram_to_cosine(x @ x.T)
    direct = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert torch.allclose(cos[0, 1], direct) and torch.allclose(cos[1, 0], direct)
    assert torch.equal(cos[2], torch.zeros(4, dtype=torch.float64))  # zero row: 0, no NaN
    assert torch.equal(cos[:, 2], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(torch.diagonal(cos), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(cos[0, 3], torch.tensor(-1.0, dtype=torch.float64))
    # Batched [..., K, K], float32, all zero: zeros, not NaN.
    batched = gram_to_cosine(torch.zeros(3, 2, 4, 4))
    assert batched.shape == (3, 2, 4, 4) and torch.equal(batched, torch.zeros(3, 2, 4, 4))
    # eps: norms at or below it count as zero.
    g = torch.tensor([[1e-12, 0.0], [0.0, 1.0]])
    assert torch.equal(gram_to_cosine(g, eps=1e-5), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_grad_cosine_per_tensor_and_global(backend, device):
    grads = [[g.to(device) for g in seq] for seq in make_grads(3, shapes=[(17,), (29,)], seed=12)]
    grads[2][0] = None
    cos = grad_cosine(grads, backend=backend)
    assert not bool(cos.per_tensor.isnan().any()) and not bool(cos.total.isnan().any())
    assert torch.equal(cos.per_tensor[0, 2], torch.zeros(3))
    assert cos.per_tensor[1, 2, 2] == 1.0
    flat = [
        torch.cat(
            [(g if g is not None else torch.zeros(17, device=device)).reshape(-1) for g in seq]
        )
        for seq in grads
    ]
    want = torch.nn.functional.cosine_similarity(flat[0].double(), flat[1].double(), dim=0)
    assert torch.allclose(cos.total[0, 1].double().cpu(), want.cpu(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def test_errors():
    a, b = torch.randn(3), torch.randn(4)
    with pytest.raises(ValueError, match=r"grads\[1\] has 1 tensors but grads\[0\] has 2"):
        grad_gram([[a, b], [a]])
    with pytest.raises(ValueError, match=r"grads\[1\]\[0\] has shape \(4,\) but grads\[0\]\[0\]"):
        grad_gram([[a], [b]])
    with pytest.raises(ValueError, match=r"grads\[1\]\[0\] has dtype torch.bfloat16"):
        grad_gram([[a], [a.bfloat16()]])
    with pytest.raises(
        ValueError, match=r"grads\[1\]\[0\] is on meta but grads\[0\]\[0\] is on cpu"
    ):
        grad_gram([[a], [torch.empty(3, device="meta")]])
    with pytest.raises(ValueError, match=r"grads\[0\]\[1\] must be float32"):
        grad_gram([[a, torch.ones(3, dtype=torch.int64)]])
    with pytest.raises(TypeError, match=r"grads\[0\]\[1\] must be a torch.Tensor or None"):
        grad_gram([[a, 3.0]])
    with pytest.raises(TypeError, match=r"grads must be a sequence"):
        grad_gram(a)
    with pytest.raises(TypeError, match=r"grads\[0\] must be a sequence"):
        grad_gram([a, a])
    with pytest.raises(ValueError, match="at least one objective"):
        grad_gram([])
    with pytest.raises(ValueError, match=r"initialised torch\.distributed"):
        grad_gram([[a]], reduce=True)
    with pytest.raises(TypeError, match="reduce must be a bool"):
        grad_gram([[a]], reduce="yes")
    with pytest.raises(ValueError, match="backend must be one of"):
        grad_gram([[a]], backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        grad_gram([[None]], backend="cuda")


# ---------------------------------------------------------------------------------------
# distributed: two gloo processes on CPU
# ---------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_distributed_matches_single_process(tmp_path):
    from unlearnopt.native import native_error

    worker = Path(__file__).parents[1] / "distributed" / "grad_gram_worker.py"
    out = tmp_path / "result.pt"
    backend = "native" if native_error() is None else "reference"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(out),
        backend,
    ]
    proc = subprocess.run(
        cmd,
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = torch.load(out, weights_only=False)
    want = oracle(res["full"])
    for name in ("auto", "plain"):
        per, total = res[name]
        assert torch.allclose(per.double(), want.per_tensor, rtol=1e-5, atol=1e-5), name
        assert torch.allclose(total.double(), want.total, rtol=1e-5, atol=1e-5), name
    # reduce=False left the local Grams alone: summed by hand they count the replicated
    # tensor (index 3) once per rank.
    expect = want.per_tensor.clone()
    expect[3] *= res["world"]
    assert torch.allclose(res["local_sum"].double(), expect, rtol=1e-5, atol=1e-5)
