"""UNDIAL on the masked-KL machinery: the loss from head inputs equals the loss from logits
and a plain-PyTorch formula written here, the context picks the head path when it has one,
and the unlearner's fused-linear step equals its logits step without ever building
``[B, T, V]`` logits of the model or of the reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.assertions import assert_allclose, assert_within
from tests.conftest import seeded
from tests.tiny_models import VOCAB, make_batch, make_model, perturb_lora
from unlearnopt.contract import ObjectiveContext
from unlearnopt.objectives import undial_loss, undial_loss_from_hidden, undial_loss_of
from unlearnopt.output_head import HeadInputs
from unlearnopt.unlearner import MultiObjectiveUnlearner


def plain_undial(logits, ref_logits, labels, gamma):
    """Mean over labelled next tokens of -sum_v q_v log p_v, q = softmax(z_ref - gamma e_y)."""
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    y = labels[:, 1:]
    keep = y != -100
    target = ref_logits[:, :-1].double().detach().clone()
    target[(*keep.nonzero(as_tuple=True), y[keep])] -= gamma
    ce = -(target.softmax(-1) * lp).sum(-1)
    return ce[keep].sum() / keep.sum().clamp(min=1)


def heads(seed=0, b=2, t=5, h=6, vocab=29, with_bias=True):
    g = seeded(seed)
    head = HeadInputs(
        torch.randn(b, t, h, generator=g).requires_grad_(),
        torch.randn(vocab, h, generator=g).requires_grad_(),
        torch.randn(vocab, generator=g).requires_grad_() if with_bias else None,
    )
    ref_head = HeadInputs(
        torch.randn(b, t, h + 2, generator=g),
        torch.randn(vocab, h + 2, generator=g),
        torch.randn(vocab, generator=g) if with_bias else None,
    )
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[:, :2] = -100
    labels[1, 3] = -100
    return head, ref_head, labels


def grads(loss, head):
    leaves = [x for x in (head.hidden, head.weight, head.bias) if x is not None]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("gamma", [10.0, 0.5, 0.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_loss_equals_logits_loss_and_plain_formula(gamma, with_bias):
    head, ref_head, labels = heads(with_bias=with_bias)
    from_hidden = undial_loss_from_hidden(head, ref_head, labels, gamma)
    from_logits = undial_loss(head.logits(), ref_head.logits(), labels, gamma)
    plain = plain_undial(head.logits(), ref_head.logits(), labels, gamma)
    assert from_hidden.dtype == torch.float32
    assert_allclose("hidden vs logits", from_hidden, from_logits, rtol=1e-5, atol=1e-6)
    assert_allclose("hidden vs plain", from_hidden.double(), plain, rtol=1e-5, atol=1e-6)
    for name, a, b, c in zip(
        ("hidden", "weight", "bias"),
        grads(from_hidden, head),
        grads(from_logits, head),
        grads(plain, head),
    ):
        assert_allclose(f"grad {name} hidden vs logits", a, b, rtol=1e-4, atol=1e-6)
        assert_allclose(f"grad {name} hidden vs plain", a.double(), c, rtol=1e-4, atol=1e-6)


def test_loss_value_is_the_cross_entropy_not_the_kl():
    """The reported value is UNDIAL's cross-entropy: KL(q || p) + H(q), H(q) > 0."""
    head, ref_head, labels = heads(seed=3)
    got = undial_loss_from_hidden(head, ref_head, labels, 10.0)
    z, r = head.logits().detach().double(), ref_head.logits().double()
    y = labels[:, 1:]
    keep = y != -100
    r = r[:, :-1].clone()
    r[(*keep.nonzero(as_tuple=True), y[keep])] -= 10.0
    lq, lp = r.log_softmax(-1), z[:, :-1].log_softmax(-1)
    kl = (lq.exp() * (lq - lp)).sum(-1)[keep].mean()
    entropy = -(lq.exp() * lq).sum(-1)[keep].mean()
    assert float(entropy) > 0.1
    assert float(got.detach()) == pytest.approx(float(kl + entropy), rel=1e-5)


def test_undial_loss_of_reads_the_head_when_the_context_has_one():
    head, ref_head, labels = heads(seed=4)

    def no_logits(batch, kind):
        raise AssertionError("the head path must not read the logits")

    ctx = ObjectiveContext(
        {"labels": labels},
        "forget",
        no_logits,
        no_logits,
        head_forward=lambda b, k: head,
        ref_head_forward=lambda b, k: ref_head,
    )
    got = undial_loss_of(ctx, 2.0)
    logits_ctx = ObjectiveContext(
        {"labels": labels}, "forget", lambda b, k: head.logits(), lambda b, k: ref_head.logits()
    )
    want = undial_loss_of(logits_ctx, 2.0)
    assert_allclose("context paths", got, want, rtol=1e-5, atol=1e-6)


def test_gamma_is_checked():
    head, ref_head, labels = heads()
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="gamma"):
            undial_loss_from_hidden(head, ref_head, labels, bad)
    with pytest.raises(ValueError, match="gamma"):
        undial_loss(head.logits(), ref_head.logits(), labels, -1.0)


# -- the unlearner: fused-linear step == logits step --------------------------------------------


def _models(kind):
    model = make_model(kind, dtype=torch.float64)
    if kind == "lora":
        return perturb_lora(model), None
    ref = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, ref


def _head_widths(*models):
    """The last dim of every output of the models' output heads (V on the logits path)."""
    widths = []
    for m in models:
        if m is not None:
            m.get_output_embeddings().register_forward_hook(
                lambda mod, args, out: widths.append(out.shape[-1])
            )
    return widths


def _run(kind, fused, options):
    model, ref = _models(kind)
    widths = _head_widths(model, ref)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3, momentum=0.5)
    forget = make_batch(kind, batch=3, seq=10, seed=1, dtype=torch.float64)
    retain = make_batch(kind, batch=3, seq=10, seed=2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float64 runs on the reference
        unlearner = MultiObjectiveUnlearner(
            model, opt, "undial", ref_model=ref, fused_linear=fused, **options
        )
        stats = [unlearner.step(forget, retain) for _ in range(2)]
    assert unlearner.heads.active == fused
    return stats, [p.detach().clone() for p in model.parameters()], widths


@pytest.mark.parametrize(
    "options", [{}, {"gamma": 2.0, "retain_weight": 1.0}], ids=["default", "retain"]
)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "lora"])
def test_fused_linear_step_equals_logits_step(kind, options):
    fused_stats, fused_params, fused_widths = _run(kind, True, options)
    assert fused_widths and VOCAB not in fused_widths, "the fused path built [B, T, V] logits"
    logits_stats, logits_params, logits_widths = _run(kind, False, options)
    assert VOCAB in logits_widths
    for a, b in zip(fused_stats, logits_stats):
        assert a.keys() == b.keys() and "loss/forget_undial" in a
        for k in b:
            assert_within(
                f"stat {k}", torch.tensor(a[k]), torch.tensor(b[k]), 1e-9 * (1 + abs(b[k]))
            )
    start = _models(kind)[0].parameters()
    assert max(float((a - s).abs().max()) for a, s in zip(fused_params, start)) > 0
    for i, (a, b) in enumerate(zip(fused_params, logits_params)):
        assert_allclose(f"parameter {i}", a, b, rtol=1e-9, atol=1e-12)
