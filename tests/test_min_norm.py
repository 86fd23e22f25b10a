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
KKT_TOL = 1e-9        # exact paths (K <= 8) in float64; observed ~1e-15
VALUE_TOL = 1e-11     # relative to max diag, against another exact solver


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


# K > 8 (FISTA + polishing) is exact on these cases; on nearly collinear, 1e-4..1e4
# scaled and float32-rounded Gram matrices 500 FISTA steps leave relative value gaps up to
# ~1e-4 (measured: 5e-5 at K = 10, 1.1e-4 at K = 13; KKT residual up to 2e-4).
EXACT_BEYOND_8 = ("zero", "rank_deficient", "conflicting", "scales_1e-1_1e1", "identical",
                  "one_zero", "random_psd")


@pytest.mark.parametrize("k", (10, 13))
def test_fista_beyond_enumeration(k):
    """K > 8: FISTA + polishing against NNLS; prints the KKT residual reached."""
    gram, names = _bank(k, n=2)
    gram = gram.cpu()
    exact = torch.tensor([name in EXACT_BEYOND_8 for name in names])
    v_nnls = torch.stack([_quad(g, torch.from_numpy(nnls_min_norm(g.numpy()))) for g in gram])
    for backend in ("reference", "native") if _native_ok() else ("reference",):
        out = min_norm(gram, backend=backend)
        w = out.weights
        assert (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(len(names), dtype=w.dtype))
        r = kkt_residual(gram, w)
        gap = (out.value - v_nnls) / _scale(gram)
        print(f"K={k} {backend}: KKT residual max {float(r.max()):.1e} (exact cases "
              f"{float(r[exact].max()):.1e}), value gap max {float(gap.max()):.1e}")
        assert r[exact].max() < 1e-6 and gap[exact].abs().max() < 1e-9
        assert r.max() < 1e-3 and gap.max() < 5e-4


def test_big_batch(backend):
    """B = 100 000 for K = 2, 3 (small batches for the Triton interpreter)."""
    b = 64 if backend == "triton" and interpreting() else 100_000
    gen = torch.Generator().manual_seed(0)
    for k in ((2,) if b == 64 else (2, 3)):
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
    ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], 0.5),             # orthogonal unit vectors
    ([[1.0, 0.0], [0.0, 4.0]], [0.8, 0.2], 0.8),             # w1 = (4 - 0) / (1 + 4)
    ([[1.0, -1.0], [-1.0, 1.0]], [0.5, 0.5], 0.0),           # opposite: origin in the hull
    ([[1.0, 2.0], [2.0, 4.0]], [1.0, 0.0], 1.0),             # g2 = 2 g1: vertex 1
    ([[1.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]], [2 / 3, 1 / 6, 1 / 6], 2 / 3),  # w ~ 1/G_ii
    ([[1.0, 0, 1], [0, 1.0, 1], [1, 1, 2.0]], [0.5, 0.5, 0.0], 0.5),  # g3 = g1 + g2 inactive
    ([[0.0, 0, 0], [0, 0.0, 0], [0, 0, 0.0]], [1 / 3, 1 / 3, 1 / 3], 0.0),  # zero: uniform
]


@pytest.mark.parametrize("gram,weights,value", GOLDEN)
def test_golden(backend, gram, weights, value):
    out = min_norm(torch.tensor(gram, dtype=torch.float64, device=DEVICE), backend=backend)
    assert torch.allclose(out.weights.cpu(), torch.tensor(weights, dtype=torch.float64),
                          atol=1e-12)
    assert abs(float(out.value) - value) < 1e-12


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32),
                                             (torch.float64, torch.float64)])
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
    out = min_norm(gram, check_finite=False)  # no check, no crash
    assert out.weights.shape == (3,)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"gram must be \[K, K\] or \[B, K, K\]"):
        min_norm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="gram must be"):
        min_norm(torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="floating"):
        min_norm(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="gram must be a torch.Tensor"):
        min_norm(np.eye(3))
    with pytest.raises(ValueError, match="iters"):
        min_norm(torch.eye(3), iters=-1)
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
