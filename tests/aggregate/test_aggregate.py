"""Weightings (Gram -> coefficients) and the combination (coefficients -> gradient).

Property tests over the shared bank of hard Gram matrices (tests/hard_grams.py): KKT of
the min-norm point of the rescaled gradients, sit-out equals the problem restricted to
the active objectives, batched equals looped, permutation and scale invariance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.hard_grams import CASES, WELL_POSED, gradients, hard_grams, nnls_min_norm
from unlearnopt.aggregate import (
    Aggregator,
    FixedWeights,
    MinNormWeights,
    Weighting,
    combine_gradients,
)


def rescaled_gram(gram: torch.Tensor, normalize: str, active: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch rescaling, written independently of the weighting."""
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    out = []
    for b in range(gram.shape[0]):
        s = torch.ones_like(norms[b])
        nz = norms[b] > 0
        if normalize == "unit":
            s[nz] = 1 / norms[b][nz]
        elif normalize == "mean":
            s[nz] = norms[b][active[b]].mean() / norms[b][nz]
        out.append(gram[b] * s[:, None] * s[None, :])
    return torch.stack(out)


@pytest.mark.parametrize("normalize", ["mean", "unit", "none"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_min_norm_weights_kkt_on_rescaled(k, normalize):
    weighting = MinNormWeights(normalize=normalize, sit_out=0.0)
    for case, gram in hard_grams(k).items():
        res = weighting(gram)
        w = res.weights
        assert torch.allclose(w.sum(-1), torch.ones(gram.shape[0], dtype=w.dtype)), case
        assert bool((w >= 0).all()), case
        g_hat = rescaled_gram(gram, normalize, res.active)
        gw = torch.einsum("bij,bj->bi", g_hat, w)
        value = torch.einsum("bi,bi->b", w, gw)
        scale = torch.diagonal(g_hat, dim1=-2, dim2=-1).amax(-1).clamp(min=1e-300)
        # <d, ĝ_i> >= ||d||^2 for every i (common descent of the rescaled gradients).
        assert bool(((gw - value[:, None]) / scale[:, None] >= -1e-7).all()), case
        # coefficients = weights * scales: d = sum c_i g_i equals sum w_i ĝ_i.
        norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()
        with_c = torch.einsum("bi,bij,bj->b", res.coefficients, gram, res.coefficients)
        assert torch.allclose(with_c, value, rtol=1e-6, atol=1e-12 * float(norms.max() ** 2 + 1))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_min_norm_weights_match_independent_solver(k):
    weighting = MinNormWeights(normalize="none", sit_out=0.0)
    for case in WELL_POSED:
        gram = hard_grams(k, cases=(case,))[case]
        w = weighting(gram).weights
        for b in range(gram.shape[0]):
            expected = nnls_min_norm(gram[b].numpy())
            np.testing.assert_allclose(w[b].numpy(), expected, atol=1e-6, err_msg=case)


def test_sit_out_equals_restricted_problem():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(6, 4, 9, generator=gen, dtype=torch.float64)
    g[:, 1] *= 1e-5  # objective 1: rounding noise
    g[:3, 3] *= 5e-4  # objective 3 too, in half the problems
    gram = g @ g.transpose(-1, -2)
    for normalize in ("mean", "unit", "none"):
        res = MinNormWeights(normalize=normalize, sit_out=1e-3)(gram)
        assert not bool(res.active[:, 1].any())
        assert res.active[:, 3].tolist() == [False] * 3 + [True] * 3
        for b in range(6):
            keep = res.active[b].nonzero().flatten()
            assert bool((res.weights[b][~res.active[b]] == 0).all())
            sub = rescaled_gram(
                gram[b : b + 1][:, keep][:, :, keep],
                normalize,
                torch.ones(1, len(keep), dtype=torch.bool),
            )[0]
            expected = nnls_min_norm(sub.numpy())
            np.testing.assert_allclose(res.weights[b][keep].numpy(), expected, atol=1e-6)


def test_sit_out_zero_keeps_everyone_and_all_zero_is_finite():
    gram = torch.zeros(1, 3, 3, dtype=torch.float64)
    res = MinNormWeights()(gram)
    assert bool(res.active.all())
    assert bool(torch.isfinite(res.coefficients).all())
    assert torch.allclose(res.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("normalize", ["mean", "unit", "none"])
def test_batched_equals_looped_and_permutation_invariant(normalize):
    weighting = MinNormWeights(normalize=normalize)
    gram = hard_grams(3, cases=("random_psd",))["random_psd"]
    batched = weighting(gram).weights
    looped = torch.cat([weighting(gram[b : b + 1]).weights for b in range(gram.shape[0])])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)
    perm = torch.tensor([2, 0, 1])
    permuted = weighting(gram[:, perm][:, :, perm]).weights
    torch.testing.assert_close(permuted, batched[:, perm], rtol=0, atol=1e-9)


@pytest.mark.parametrize("normalize", ["mean", "unit", "none"])
def test_scale_invariance(normalize):
    weighting = MinNormWeights(normalize=normalize)
    gram = hard_grams(3, cases=("conflicting",))["conflicting"]
    w = weighting(gram).weights
    # Scaling every gradient by 8 (a GradScaler) multiplies the Gram by 64: same weights.
    torch.testing.assert_close(weighting(gram * 64).weights, w, rtol=0, atol=1e-10)
    if normalize != "none":
        # Rescaling removes each gradient's own norm: one objective scaled alone, same w.
        s = torch.tensor([1.0, 30.0, 1.0], dtype=torch.float64)
        torch.testing.assert_close(
            weighting(gram * s[:, None] * s[None, :]).weights, w, rtol=0, atol=1e-9
        )


def test_normalize_mean_spreads_weights_when_one_gradient_is_small():
    # The ANCHORS observation: a collapsed forget gradient (norm 0.05) takes all the weight
    # without rescaling; with gradients rescaled to the mean norm it does not.
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(1, 3, 50, generator=gen, dtype=torch.float64)
    g = (
        g
        / g.norm(dim=-1, keepdim=True)
        * torch.tensor([0.05, 10.0, 20.0], dtype=torch.float64)[None, :, None]
    )
    gram = g @ g.transpose(-1, -2)
    plain = MinNormWeights(normalize="none")(gram).weights[0]
    mean = MinNormWeights(normalize="mean")(gram).weights[0]
    assert plain[0] > 0.99
    assert mean.max() < 0.6


def test_fixed_weights():
    gram = torch.eye(3).expand(4, 3, 3)
    res = FixedWeights([1.0, 0.0, 2.5])(gram)
    assert res.weights.shape == (4, 3)
    assert res.coefficients[0].tolist() == [1.0, 0.0, 2.5]
    assert res.active[0].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="K=3"):
        FixedWeights([1.0, 1.0])(gram)
    with pytest.raises(ValueError, match="finite"):
        FixedWeights([float("nan")])


def test_weighting_errors():
    with pytest.raises(ValueError, match="normalize"):
        MinNormWeights(normalize="max")
    with pytest.raises(ValueError, match="sit_out"):
        MinNormWeights(sit_out=1.5)
    with pytest.raises(ValueError, match=r"\[B, K, K\]"):
        MinNormWeights()(torch.eye(3))
    with pytest.raises(ValueError, match="granularity"):
        Aggregator(FixedWeights([1.0]), granularity="per_layer")
    with pytest.raises(TypeError, match="Weighting"):
        Aggregator(lambda g: g)


def test_custom_solver_is_used():
    calls = []

    def uniform(gram):
        calls.append(gram.shape)
        return torch.full(gram.shape[:2], 1.0 / gram.shape[-1], dtype=gram.dtype)

    res = MinNormWeights(normalize="none", solver=uniform)(torch.eye(3).expand(2, 3, 3))
    assert calls == [(2, 3, 3)]
    torch.testing.assert_close(res.weights, torch.full((2, 3), 1 / 3))


def _random_grads(k: int, shapes, seed: int = 0, none_at=()):
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(k)]
    for i, p in none_at:
        grads[i][p] = None
    return grads


def test_combine_global_and_per_tensor():
    shapes = [(3, 4), (5,), (2, 2)]
    grads = _random_grads(3, shapes, none_at=[(1, 1)])
    c_global = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    out = combine_gradients(grads, c_global)
    for p in range(3):
        expected = sum(
            c_global[0, i] * (grads[i][p] if grads[i][p] is not None else 0) for i in range(3)
        )
        torch.testing.assert_close(out[p], expected)
    c_per = torch.rand(3, 3, dtype=torch.float64)
    out = combine_gradients(grads, c_per)
    for p in range(3):
        expected = sum(
            c_per[p, i] * (grads[i][p] if grads[i][p] is not None else 0) for i in range(3)
        )
        torch.testing.assert_close(out[p], expected)
    # All None for one tensor -> None; inplace reuses the first gradient's buffer.
    grads = _random_grads(2, shapes, none_at=[(0, 2), (1, 2)])
    first = grads[0][0]
    out = combine_gradients(grads, torch.tensor([1.0, 2.0]), inplace=True)
    assert out[2] is None and out[0] is first
    with pytest.raises(ValueError, match="coefficients"):
        combine_gradients(grads, torch.ones(2, 2))


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_aggregator_direction_norm_from_gram(granularity):
    shapes = [(3, 4), (5,), (2, 2)]
    grads = _random_grads(3, shapes, seed=2)
    per = torch.stack(
        [
            torch.stack(
                [
                    torch.stack([(grads[i][p] * grads[j][p]).sum() for j in range(3)])
                    for i in range(3)
                ]
            )
            for p in range(3)
        ]
    )
    agg = Aggregator(MinNormWeights(), granularity)
    res = agg.coefficients(per, per.sum(0))
    assert res.weights.shape == ((1, 3) if granularity == "global" else (3, 3))
    d = agg.combine(grads, res.coefficients)
    actual = sum(float((t * t).sum()) for t in d)
    assert abs(float(agg.direction_sq_norm(per, res.coefficients)) - actual) < 1e-10 * actual
    # Per-tensor MGDA: <d_p, ĝ_{i,p}> >= ||d_p||^2 for every tensor p.
    if granularity == "per_tensor":
        for p in range(3):
            w = res.weights[p]
            s = res.coefficients[p] / w.clamp(min=1e-300)
            for i in range(3):
                if w[i] > 1e-9:
                    lhs = float((d[p] * grads[i][p]).sum() * s[i])
                    assert lhs >= float((d[p] * d[p]).sum()) * (1 - 1e-7)


def test_all_cases_produce_finite_coefficients():
    for k in (1, 2, 3, 6):
        for case, gram in hard_grams(k).items():
            for normalize in ("mean", "unit", "none"):
                res = MinNormWeights(normalize=normalize)(gram)
                assert bool(torch.isfinite(res.coefficients).all()), (case, k, normalize)
    assert isinstance(MinNormWeights(), Weighting) and CASES and gradients
