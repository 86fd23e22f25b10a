"""Update masks (unlearnopt.aggregate.masks) on tiny hand-made gradients.

Each test builds gradients where the expected masked direction can be written down, and
compares with a plain-PyTorch direction computed independently of the module.
"""

from __future__ import annotations

import pytest
import torch

from unlearnopt.aggregate import Aggregator, FixedWeights, MinNormWeights
from unlearnopt.aggregate.masks import CosineMask, MaskedAggregator, SaliencyMask
from unlearnopt.reference.grad_gram import grad_gram


def _direction(agg: Aggregator, grads):
    gram = grad_gram(grads)
    res = agg.coefficients(gram.per_tensor, gram.total)
    return agg.combine(grads, res.coefficients)


def _conflict_grads():
    """Tensor 0: forget and retain conflict (cos < 0); tensor 1: they agree; tensor 2:
    retain gradient zero there."""
    forget = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]
    retain = [torch.tensor([-1.0, 0.5]), torch.tensor([[2.0, 1.0]]), torch.tensor([0.0])]
    return [forget, retain]


def test_cosine_mask_values():
    grads = _conflict_grads()
    cos = CosineMask().cosines(grad_gram(grads).per_tensor)
    expected = [
        torch.nn.functional.cosine_similarity(f.reshape(-1), r.reshape(-1), dim=0)
        for f, r in zip(grads[0][:2], grads[1][:2])
    ]
    torch.testing.assert_close(cos[:2], torch.stack(expected).to(cos.dtype))
    assert float(cos[2]) == 0.0  # no retain signal


def test_cosine_mask_drops_forget_contribution_where_it_conflicts():
    grads = _conflict_grads()
    agg = MaskedAggregator(Aggregator(FixedWeights([1.0, 1.0])), CosineMask(threshold=0.0))
    d = _direction(agg, grads)
    f, r = grads
    torch.testing.assert_close(d[0], r[0])  # forget dropped, retain kept
    torch.testing.assert_close(d[1], f[1] + r[1])
    torch.testing.assert_close(d[2], f[2] + r[2])


def test_cosine_mask_soft_ramp_and_all_targets():
    grads = _conflict_grads()
    mask = CosineMask(threshold=0.5, soft=True)
    cos = mask.cosines(grad_gram(grads).per_tensor)
    agg = MaskedAggregator(Aggregator(FixedWeights([1.0, 2.0])), mask, targets=None)
    d = _direction(agg, grads)
    s1 = float(((cos[1] - 0.5) / 0.5).clamp(0, 1))
    torch.testing.assert_close(d[0], torch.zeros(2))
    torch.testing.assert_close(d[1], s1 * (grads[0][1] + 2 * grads[1][1]))


def test_cosine_mask_with_min_norm_per_tensor():
    grads = _conflict_grads()
    inner = Aggregator(MinNormWeights("none", 0.0), "per_tensor")
    gram = grad_gram(grads)
    plain = inner.coefficients(gram.per_tensor, gram.total).coefficients
    res = MaskedAggregator(inner, CosineMask()).coefficients(gram.per_tensor, gram.total)
    assert res.coefficients.shape == (3, 2)
    assert float(res.coefficients[0, 0]) == 0.0
    torch.testing.assert_close(res.coefficients[0, 1], plain[0, 1])
    torch.testing.assert_close(res.coefficients[1:], plain[1:])


def test_saliency_mask_keeps_global_top_fraction_of_forget_entries():
    forget = [torch.tensor([0.1, -5.0, 0.2, 0.3]), torch.tensor([[4.0, 0.0], [-0.5, 3.0]])]
    retain = [torch.ones(4), torch.ones(2, 2)]
    agg = MaskedAggregator(Aggregator(FixedWeights([1.0, 1.0])), SaliencyMask(fraction=0.375))
    d = _direction(agg, [forget, retain])
    # 8 entries, keep ceil(3) = 3: |-5|, |4|, |3|
    keep = [torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    for p in range(2):
        torch.testing.assert_close(d[p], forget[p] * keep[p] + retain[p])


def test_saliency_ratio_prefers_entries_the_retain_gradient_does_not_need():
    forget = [torch.tensor([5.0, 1.0, 0.5])]
    retain = [torch.tensor([50.0, 0.01, 1.0])]
    mask = SaliencyMask(fraction=1 / 3, score="ratio")
    m = mask.element_masks([forget, retain])[0]
    torch.testing.assert_close(m, torch.tensor([0.0, 1.0, 0.0]))
    # by |g_f| alone the first entry would win
    m_plain = SaliencyMask(fraction=1 / 3).element_masks([forget, retain])[0]
    torch.testing.assert_close(m_plain, torch.tensor([1.0, 0.0, 0.0]))


def test_saliency_rows():
    forget = [torch.tensor([[3.0, 4.0], [0.1, 0.1], [1.0, 1.0]]), torch.tensor([0.2, 9.0])]
    retain = [torch.zeros(3, 2), torch.zeros(2)]
    masks = SaliencyMask(fraction=0.4, unit="row").element_masks([forget, retain])
    # 5 rows (3 of the matrix, 2 entries of the vector), keep 2: norms 5 and 9
    torch.testing.assert_close(masks[0], torch.tensor([[1.0], [0.0], [0.0]]))
    torch.testing.assert_close(masks[1], torch.tensor([0.0, 1.0]))


def test_inplace_combine_matches_out_of_place():
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)] for _ in range(3)]
    agg = MaskedAggregator(Aggregator(MinNormWeights()), [CosineMask(), SaliencyMask(0.3)])
    gram = grad_gram(grads)
    c = agg.coefficients(gram.per_tensor, gram.total).coefficients
    expected = agg.combine(grads, c)
    got = agg.combine([[g.clone() for g in per] for per in grads], c, inplace=True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_masked_step_leaves_unselected_entries_alone():
    from tests.tiny_models import make_batch, make_model
    from unlearnopt.methods import make_method
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    model = make_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    method = make_method("ga")
    method.aggregator = lambda: MaskedAggregator(
        Aggregator(FixedWeights([1.0])), SaliencyMask(fraction=0.01), targets=None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    MultiObjectiveUnlearner(model, opt, method=method).step(forget=make_batch(model))
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    total = sum(p.numel() for p in model.parameters())
    assert 0 < changed <= 0.011 * total + 1


@pytest.mark.parametrize(
    "bad",
    [
        lambda: CosineMask(threshold=1.0),
        lambda: CosineMask(forget=0, retain=(0, 1)),
        lambda: SaliencyMask(fraction=0.0),
        lambda: SaliencyMask(score="size"),
        lambda: SaliencyMask(unit="column"),
        lambda: MaskedAggregator(Aggregator(FixedWeights([1.0])), []),
        lambda: MaskedAggregator("global", CosineMask()),
    ],
)
def test_bad_arguments_raise(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


def test_mask_naming_a_missing_objective_raises():
    grads = _conflict_grads()
    gram = grad_gram(grads)
    with pytest.raises(ValueError, match="only K=2"):
        CosineMask(retain=(3,)).cosines(gram.per_tensor)
    with pytest.raises(ValueError, match="only K=2"):
        SaliencyMask(forget=2).element_masks(grads)
