"""min_norm / kkt_residual: every backend against the reference, properties over the bank
of hard Gram matrices (tests/hard_grams.py), an independent solver (scipy NNLS), golden
values and error cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import DEVICE
from tests.hard_grams import CASES, WELL_POSED, hard_grams, nnls_min_norm
from unlearnopt.kernels import interpreting
from unlearnopt.ops.min_norm import MinNorm, kkt_residual, min_norm
from unlearnopt.reference import min_norm as ref

KS = tuple(range(1, 9))
KKT_TOL = 1e-9  # exact paths (K <= 8) in float64; observed ~1e-15
VALUE_TOL = 1e-11  # relative to max diag, against another exact solver


def _interpreted_triton_too_slow(backend: str, k: int) -> bool:
    # The Triton interpreter runs ~(2^K) x K^3 numpy ops per program: keep it to K <= 4.
    return backend == "triton" and interpreting() and k > 4


def _bank(k: int, n: int = 4) -> tuple[torch.Tensor, list[str]]:
    grams = hard_grams(k, n=n)
    names = [name for name, g in grams.items() for _ in range(g.shape[0])]
    return torch.cat(list(grams.values())).to(DEVICE), names


def _scale(g: torch.Tensor) -> torch.Tensor:
    return g.diagonal(dim1=-2, dim2=-1).amax(-1).clamp(min=1e-300)


def _quad(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    g = ((g + g.transpose(-1, -2)) / 2).double()
    w = w.double()
    return (w * (g @ w.unsqueeze(-1)).squeeze(-1)).sum(-1)


@pytest.mark.parametrize("k", KS)
def test_matches_reference_and_properties(backend, k):
    if _interpreted_triton_too_slow(backend, k):
        pytest.skip("Triton interpreter: K > 4 takes minutes (runs on CUDA)")
    n = 1 if backend == "triton" and interpreting() else 4
    gram, names = _bank(k, n)
    out = min_norm(gram, backend=backend)
    expect = ref.min_norm(gram.cpu())
    assert isinstance(out, MinNorm)
    w, v = out.weights.cpu(), out.value.cpu()
    assert w.shape == (gram.shape[0], k) and v.shape == (gram.shape[0],)
    assert w.dtype == torch.float64 and not w.requires_grad
    scale = _scale(gram.cpu())
    # Values agree with the reference (the optimum is unique even when the weights are not).
    assert ((v - expect.value).abs() / scale).max() < VALUE_TOL
    # Weights agree where the optimal weights are unique and well conditioned.
    well = torch.tensor([name in WELL_POSED for name in names])
    assert torch.allclose(w[well], expect.weights[well], atol=1e-9)
    # On the simplex.
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones_like(v), atol=1e-12)
    # KKT conditions.
    r = kkt_residual(gram.cpu(), w)
    worst = int(r.argmax())
    assert r.max() < KKT_TOL, f"KKT residual {float(r.max()):.3g} on case {names[worst]!r}"
    # No worse than every vertex and than uniform weights.
    g = gram.cpu()
    diag = g.diagonal(dim1=-2, dim2=-1)
    assert (v[:, None] <= diag + 1e-12 * scale[:, None]).all()
    uniform = _quad(g, torch.full_like(w, 1.0 / k))
    assert (v <= uniform + 1e-12 * scale).all()
    # Value is w^T G w of the returned weights.
    assert torch.allclose(v, _quad(g, w), rtol=1e-12, atol=1e-14 * float(scale.max()))
    # Zero gradients: uniform weights.
    zero = torch.tensor([name == "zero" for name in names])
    assert torch.allclose(w[zero], torch.full_like(w[zero], 1.0 / k))


@pytest.mark.parametrize("k", (2, 3, 4, 5, 8))
def test_against_independent_nnls(k):
    gram, names = _bank(k)
    out = min_norm(gram.cpu(), backend="native" if _native_ok() else "reference")
    for i, name in enumerate(names):
        w_nnls = torch.from_numpy(nnls_min_norm(gram[i].cpu().numpy()))
        v_nnls = _quad(gram[i].cpu(), w_nnls)
        scale = float(_scale(gram[i].cpu()))
        assert abs(float(out.value[i]) - float(v_nnls)) <= VALUE_TOL * scale, name


def _native_ok() -> bool:
    from unlearnopt.native import native_error

    return DEVICE.type == "cpu" and native_error() is None


@pytest.mark.parametrize("k", (3, 5, 8))
def test_permutation_equivariance(backend, k):
    if _interpreted_triton_too_slow(backend, k):
        pytest.skip("Triton interpreter: K > 4 takes minutes (runs on CUDA)")
    grams = hard_grams(k, n=2)
    gram = torch.cat([grams[c] for c in CASES]).to(DEVICE)
    well = torch.cat([torch.full((grams[c].shape[0],), c in WELL_POSED) for c in CASES])
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    permuted = gram[:, perm][:, :, perm]
    a = min_norm(gram, backend=backend)
    b = min_norm(permuted, backend=backend)
    scale = _scale(gram).cpu()
    assert (((a.value - b.value).cpu().abs()) / scale).max() < VALUE_TOL
    assert torch.allclose(a.weights[:, perm][well], b.weights[well], atol=1e-9)


@pytest.mark.parametrize("factor", (1e-6, 3.0, 1e6))
def test_scale_invariance(backend, factor):
    k = 3 if backend == "triton" and interpreting() else 6
    grams = hard_grams(k, n=2, cases=WELL_POSED)
    gram = torch.cat(list(grams.values())).to(DEVICE)
    a = min_norm(gram, backend=backend)
    b = min_norm(gram * factor, backend=backend)
    assert torch.allclose(a.weights, b.weights, atol=1e-9)
    assert torch.allclose(b.value, a.value * factor, rtol=1e-9)


@pytest.mark.parametrize("k", (9, 10, 13, 20))
def test_active_set_beyond_enumeration_is_exact(backend, k):
    """K > 8 (Lawson-Hanson active set): exact on every case of the bank, against NNLS."""
    gram, names = _bank(k, n=2)
    out = min_norm(gram, backend=backend)
    g = gram.cpu()
    w, v = out.weights.cpu(), out.value.cpu()
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones_like(v), atol=1e-12)
    r = kkt_residual(g, w)
    worst = int(r.argmax())
    assert r.max() < KKT_TOL, f"KKT residual {float(r.max()):.3g} on case {names[worst]!r}"
    v_nnls = torch.stack([_quad(x, torch.from_numpy(nnls_min_norm(x.numpy()))) for x in g])
    gap = (v - v_nnls) / _scale(g)
    assert gap.abs().max() < VALUE_TOL, f"value gap {float(gap.abs().max()):.3g}"
    well = torch.tensor([name in WELL_POSED for name in names])
    assert torch.allclose(w[well], ref.min_norm(g).weights[well], atol=1e-9)


def _strictly_weak(k: int, dim: int, seed: int) -> torch.Tensor:
    """``[k, dim]`` rows of rank ``dim`` with ``sum_i c_i g_i = 0`` for some c > 0: the
    origin is inside the hull (min-norm value 0, many optimal weightings)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    c = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    return a - torch.outer(c, c @ a) / (c @ c)


@pytest.mark.parametrize("k,dim", [(20, 10), (12, 5)])
def test_strictly_weak_exact_and_permutation_invariant(backend, k, dim):
    """Value 0 to rounding, and the min-norm point d = w @ A does not move when the
    objectives are permuted (FISTA left value 2.8e-5 and moved d by as much)."""
    a = torch.stack([_strictly_weak(k, dim, seed) for seed in range(3)])
    gram = (a @ a.transpose(-1, -2)).to(DEVICE)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    out = min_norm(gram, backend=backend)
    out_p = min_norm(gram[:, perm][:, :, perm], backend=backend)
    scale = _scale(gram.cpu())
    assert (out.value.cpu().abs() / scale).max() < 1e-13
    assert kkt_residual(gram.cpu(), out.weights.cpu()).max() < KKT_TOL
    d = (out.weights.cpu().unsqueeze(1) @ a).squeeze(1)
    d_p = (out_p.weights.cpu().unsqueeze(1) @ a[:, perm]).squeeze(1)
    assert (d - d_p).norm(dim=-1).max() < 1e-12 * scale.sqrt().max()


def test_strictly_weak_against_torchjd_mgda():
    pytest.importorskip("torchjd")
    from torchjd.aggregation import MGDA

    a = _strictly_weak(20, 10, seed=0)
    d = min_norm(a @ a.T).weights @ a
    d_jd = MGDA()(a)
    assert float(d.norm()) <= float(d_jd.norm()) + 1e-12


def test_active_set_step_cap():
    """``iters`` caps the active-set steps: 0 steps leave the smallest vertex."""
    gram, _ = _bank(10, n=1)
    out = min_norm(gram.cpu(), iters=0, backend="reference")
    first = gram.cpu().diagonal(dim1=-2, dim2=-1).argmin(-1)
    nonzero = gram.cpu().diagonal(dim1=-2, dim2=-1).amax(-1) > 0
    expect = torch.nn.functional.one_hot(first, 10).double()
    assert torch.equal(out.weights[nonzero], expect[nonzero])


def test_big_batch(backend):
    """B = 100 000 for K = 2, 3 (small batches for the Triton interpreter)."""
    b = 64 if backend == "triton" and interpreting() else 100_000
    gen = torch.Generator().manual_seed(0)
    for k in (2,) if b == 64 else (2, 3):
        g = torch.randn(b, k, 5, generator=gen, dtype=torch.float64)
        gram = (g @ g.transpose(-1, -2)).float().to(DEVICE)
        out = min_norm(gram, backend=backend)
        assert out.weights.shape == (b, k) and out.weights.dtype == torch.float32
        r = kkt_residual(gram, out.weights)
        assert r.max() < 1e-6  # float32 weights: rounding of the output
        if k == 2:
            g11, g22, g12 = gram[:, 0, 0].double(), gram[:, 1, 1].double(), gram[:, 0, 1].double()
            w1 = ((g22 - g12) / (g11 + g22 - 2 * g12)).clamp(0, 1)
            assert torch.allclose(out.weights[:, 0].double(), w1, atol=1e-5)


def test_single_problem_shapes(backend):
    g = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]], device=DEVICE)
    out = min_norm(g, backend=backend)
    assert out.weights.shape == (3,) and out.value.shape == ()
    assert torch.allclose(out.weights.cpu(), torch.tensor([0.5, 0.5, 0.0]), atol=1e-7)
    assert kkt_residual(g, out.weights).shape == ()
    one = min_norm(g.unsqueeze(0), backend=backend)
    assert one.weights.shape == (1, 3) and torch.equal(one.weights[0], out.weights)
    empty = min_norm(torch.zeros(0, 3, 3, device=DEVICE), backend=backend)
    assert empty.weights.shape == (0, 3) and empty.value.shape == (0,)


GOLDEN = [
    # (gram, weights, value), worked by hand
    ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], 0.5),  # orthogonal unit vectors
    ([[1.0, 0.0], [0.0, 4.0]], [0.8, 0.2], 0.8),  # w1 = (4 - 0) / (1 + 4)
    ([[1.0, -1.0], [-1.0, 1.0]], [0.5, 0.5], 0.0),  # opposite: origin in the hull
    ([[1.0, 2.0], [2.0, 4.0]], [1.0, 0.0], 1.0),  # g2 = 2 g1: vertex 1
    ([[1.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]], [2 / 3, 1 / 6, 1 / 6], 2 / 3),  # w ~ 1/G_ii
    ([[1.0, 0, 1], [0, 1.0, 1], [1, 1, 2.0]], [0.5, 0.5, 0.0], 0.5),  # g3 = g1 + g2 inactive
    ([[0.0, 0, 0], [0, 0.0, 0], [0, 0, 0.0]], [1 / 3, 1 / 3, 1 / 3], 0.0),  # zero: uniform
]


@pytest.mark.parametrize("gram,weights,value", GOLDEN)
def test_golden(backend, gram, weights, value):
    out = min_norm(torch.tensor(gram, dtype=torch.float64, device=DEVICE), backend=backend)
    assert torch.allclose(out.weights.cpu(), torch.tensor(weights, dtype=torch.float64), atol=1e-12)
    assert abs(float(out.value) - value) < 1e-12


@pytest.mark.parametrize(
    "dtype,out_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_dtypes_and_no_grad(dtype, out_dtype):
    g = torch.randn(3, 4, 6)
    gram = (g @ g.transpose(-1, -2)).to(dtype).requires_grad_(True)
    out = min_norm(gram)
    assert out.weights.dtype == out_dtype and out.value.dtype == out_dtype
    assert not out.weights.requires_grad and not out.value.requires_grad


def test_rounding_negative_eigenvalues_do_not_fail(backend):
    k = 4
    g = torch.randn(1, 3, 6, dtype=torch.float64).expand(8, 3, 6)
    gram = torch.zeros(8, k, k, dtype=torch.float64)
    gram[:, :3, :3] = g @ g.transpose(-1, -2)
    gram = gram - 1e-12 * torch.eye(k, dtype=torch.float64)  # eigenvalues just below 0
    gram[:, 0, 1] += 1e-9  # and asymmetric
    out = min_norm(gram.to(DEVICE), backend=backend)
    assert torch.isfinite(out.weights).all() and (out.weights >= 0).all()
    assert torch.allclose(out.weights.sum(-1).cpu(), torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_non_finite_raises(bad):
    gram = torch.eye(3)
    gram[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        min_norm(gram)
    out = min_norm(gram, check=False)  # no check, no crash
    assert out.weights.shape == (3,)


@pytest.mark.parametrize(
    "gram,what",
    [
        (-torch.eye(3), "diagonal entry >= 0"),  # the weights were uniform
        (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
        (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), r"\|G_ij\| <= sqrt"),  # cos = 2
        (torch.tensor([[0.0, 1e-3], [1e-3, 0.0]]), r"\|G_ij\| <= sqrt"),
    ],
)
def test_not_a_gram_raises(gram, what):
    with pytest.raises(ValueError, match=what):
        min_norm(gram)
    with pytest.raises(ValueError, match=what):
        min_norm(torch.stack([torch.eye(gram.shape[0]), gram]).double())
    assert min_norm(gram, check=False).weights.shape == (gram.shape[0],)


def test_gram_check_tolerates_rounding():
    """Float32 Grams of nearly collinear vectors (asymmetric, slightly indefinite) pass."""
    grams = hard_grams(6, n=4)
    for name in ("rounded_fp32", "nearly_collinear", "identical", "zero"):
        min_norm(grams[name].float())
        min_norm(grams[name])


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"gram must be \[K, K\] or \[B, K, K\]"):
        min_norm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="gram must be"):
        min_norm(torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="floating"):
        min_norm(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"gram must be a torch\.Tensor"):
        min_norm(np.eye(3))
    with pytest.raises(ValueError, match="iters"):
        min_norm(torch.eye(3), iters=-1)
    with pytest.raises(ValueError, match="iters"):
        min_norm(torch.eye(3), iters=2.5)
    with pytest.raises(ValueError, match="weights must have shape"):
        kkt_residual(torch.eye(3), torch.ones(2))
    with pytest.raises(ValueError, match="backend must be one of"):
        min_norm(torch.eye(3), backend="cuda")


def test_kkt_residual_definition():
    gram = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    assert float(kkt_residual(gram, torch.tensor([0.8, 0.2], dtype=torch.float64))) < 1e-15
    # Vertex 2: v = 4, (Gw)_1 = 0 < v by 4; relative to max diag 4 -> 1.
    assert float(kkt_residual(gram, torch.tensor([0.0, 1.0], dtype=torch.float64))) == 1.0
    # Scale free.
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert torch.allclose(kkt_residual(gram * 1e6, w), kkt_residual(gram, w))
    assert float(kkt_residual(torch.zeros(2, 2), torch.tensor([0.5, 0.5]))) == 0.0


def test_against_torchjd_mgda():
    torchjd = pytest.importorskip("torchjd")
    from torchjd.aggregation import MGDA

    k = 3
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(k, 7, generator=gen, dtype=torch.float64)
    out = min_norm(g @ g.T)
    d = out.weights @ g
    # TorchJD returns the combined vector; its Frank-Wolfe is inexact (rel. gap ~5e-4).
    d_jd = MGDA()(g)
    assert float(d.norm()) <= float(d_jd.norm()) * (1 + 1e-9)
    assert torchjd is not None
