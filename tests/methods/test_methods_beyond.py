"""SimNPO, WGA, SatImp, CE-U and UNDIAL: each loss against a plain-PyTorch formula written
here, hand-computed values, and each method's ``step()`` against a hand-written step on a
tiny model (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests.methods.step_fixtures import LR, TOL, assert_update, logits_of, ref_logits_of, setup
from unlearnopt.methods import available_methods, make_method
from unlearnopt.objectives import ce_u_loss, satimp_loss, simnpo_loss, undial_loss, wga_loss
from unlearnopt.unlearner import MultiObjectiveUnlearner

# -- plain-PyTorch formulas ------------------------------------------------------------------


def _rows(logits, labels):
    """log p of the labelled next-token rows [N, V] (float64), their labels [N], the mask."""
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    y = labels[:, 1:]
    mask = y != -100
    return lp[mask], y[mask], mask


def p_simnpo(logits, labels, beta=2.5, gamma=0.0):
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    y = labels[:, 1:]
    mask = y != -100
    tok = lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    length = mask.sum(1).clamp(min=1).double()
    return (-(2 / beta) * F.logsigmoid(-(beta / length) * tok.sum(1) - gamma)).mean()


def p_wga(logits, labels, beta=1.0):
    lp, y, _ = _rows(logits, labels)
    lpy = lp[torch.arange(len(y)), y]
    return (lpy.detach().exp() ** beta * lpy).mean()


def p_satimp(logits, labels, beta1=5.0, beta2=1.0):
    lp, y, _ = _rows(logits, labels)
    lpy = lp[torch.arange(len(y)), y]
    p = lpy.detach().exp()
    return (p**beta1 * (1 - p) ** beta2 * lpy).mean()


def p_ce_u(logits, labels):
    lp, y, mask = _rows(logits, labels)
    z = logits[:, :-1].double()[mask].detach().clone()
    z[torch.arange(len(y)), y] = -math.inf
    q = z.softmax(-1)
    ce = torch.stack([-(q[i][q[i] > 0] * lp[i][q[i] > 0]).sum() for i in range(len(y))])
    return ce.mean()


def p_undial(logits, ref_logits, labels, gamma=10.0):
    lp, y, mask = _rows(logits, labels)
    z = ref_logits[:, :-1].double()[mask].detach().clone()
    z[torch.arange(len(y)), y] -= gamma
    return (-(z.softmax(-1) * lp).sum(-1)).mean()


def _data(seed=0, b=3, t=6, v=7):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 2
    ref = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :2] = -100
    labels[0, 3] = -100  # a hole inside an answer
    labels[2, 4:] = -100  # a shorter answer
    return logits.requires_grad_(), ref, labels


CASES = [
    (
        "simnpo",
        lambda lg, rf, lb: simnpo_loss(lg, lb, 2.5, 0.0),
        lambda lg, rf, lb: p_simnpo(lg, lb, 2.5, 0.0),
    ),
    (
        "simnpo-margin",
        lambda lg, rf, lb: simnpo_loss(lg, lb, 1.5, 0.3),
        lambda lg, rf, lb: p_simnpo(lg, lb, 1.5, 0.3),
    ),
    ("wga", lambda lg, rf, lb: wga_loss(lg, lb, 1.0), lambda lg, rf, lb: p_wga(lg, lb, 1.0)),
    ("wga-b2", lambda lg, rf, lb: wga_loss(lg, lb, 2.0), lambda lg, rf, lb: p_wga(lg, lb, 2.0)),
    (
        "satimp",
        lambda lg, rf, lb: satimp_loss(lg, lb, 5.0, 1.0),
        lambda lg, rf, lb: p_satimp(lg, lb, 5.0, 1.0),
    ),
    (
        "satimp-b",
        lambda lg, rf, lb: satimp_loss(lg, lb, 0.5, 2.0),
        lambda lg, rf, lb: p_satimp(lg, lb, 0.5, 2.0),
    ),
    ("ce_u", lambda lg, rf, lb: ce_u_loss(lg, lb), lambda lg, rf, lb: p_ce_u(lg, lb)),
    (
        "undial",
        lambda lg, rf, lb: undial_loss(lg, rf, lb, 10.0),
        lambda lg, rf, lb: p_undial(lg, rf, lb, 10.0),
    ),
    (
        "undial-g1",
        lambda lg, rf, lb: undial_loss(lg, rf, lb, 1.0),
        lambda lg, rf, lb: p_undial(lg, rf, lb, 1.0),
    ),
]


@pytest.mark.parametrize("name,ours,plain", CASES, ids=[c[0] for c in CASES])
def test_loss_and_gradient_match_plain_formula(name, ours, plain):
    logits, ref, labels = _data()
    a = ours(logits, ref, labels)
    (ga,) = torch.autograd.grad(a, logits)
    b = plain(logits, ref, labels)
    (gb,) = torch.autograd.grad(b, logits)
    assert a.dtype == torch.float64
    # SimNPO's log pi comes from the fused cross-entropy op: float32 math while that op
    # computes in float32 (TOL), float64 otherwise; the others are plain float64 PyTorch.
    rtol = max(TOL, 1e-10) if name.startswith("simnpo") else 1e-10
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=rtol, atol=rtol * float(gb.abs().max()))
    assert float(ga.abs().sum()) > 0


def _two_token(p0: float):
    """logits [1, 2, 2]: one labelled token (label 0) with p(label) = p0."""
    z = math.log(p0 / (1 - p0))
    logits = torch.tensor([[[z, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 0]])
    return logits, labels


def test_hand_computed_values():
    logits, labels = _two_token(0.8)
    assert float(wga_loss(logits, labels, 1.0)) == pytest.approx(0.8 * math.log(0.8))
    assert float(satimp_loss(logits, labels, 1.0, 1.0)) == pytest.approx(0.8 * 0.2 * math.log(0.8))
    # CE-U with V = 2: q puts all its mass on the other token, so the loss is -log p(other).
    assert float(ce_u_loss(logits, labels)) == pytest.approx(-math.log(0.2))
    # SimNPO of one one-token answer: (2/beta) softplus(beta log 0.8 + gamma).
    assert float(simnpo_loss(logits, labels, 2.0, 0.5)) == pytest.approx(
        math.log1p(math.exp(2 * math.log(0.8) + 0.5))
    )
    # UNDIAL against uniform reference logits lowered by gamma = log 3 on the label:
    # q = (1/4, 3/4), loss = -(1/4 log 0.8 + 3/4 log 0.2).
    ref = torch.zeros_like(logits)
    assert float(undial_loss(logits, ref, labels, math.log(3))) == pytest.approx(
        -(0.25 * math.log(0.8) + 0.75 * math.log(0.2))
    )


def test_no_labelled_token_gives_zero_with_a_graph():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), -100)
    for loss in (
        wga_loss(logits, labels),
        satimp_loss(logits, labels),
        ce_u_loss(logits, labels),
        undial_loss(logits, logits.detach(), labels),
    ):
        assert float(loss.detach()) == 0.0
        loss.backward()
    assert float(logits.grad.abs().sum()) == 0.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda lg, lb: wga_loss(lg, lb, -1.0), "beta"),
        (lambda lg, lb: satimp_loss(lg, lb, 1.0, float("nan")), "beta2"),
        (lambda lg, lb: simnpo_loss(lg, lb, 0.0), "beta"),
        (lambda lg, lb: simnpo_loss(lg, lb, 1.0, -0.1), "gamma"),
        (lambda lg, lb: undial_loss(lg, lg[:, :1], lb), "ref_logits"),
        (lambda lg, lb: wga_loss(lg[0], lb), "logits"),
    ],
)
def test_bad_arguments_raise(call, match):
    logits, _, labels = _data()
    with pytest.raises(ValueError, match=match):
        call(logits, labels)


# -- the methods' steps ----------------------------------------------------------------------


def h_nll(logits, labels):
    lp, y, _ = _rows(logits, labels)
    return -lp[torch.arange(len(y)), y].mean()


def handwritten(method, opts, model, ref, forget, retain):
    """[(loss, weight)] in the method's order."""
    lf = logits_of(model, forget)
    fl = forget["labels"]
    cfg = make_method(method, **opts).config
    if method == "simnpo":
        out = [(p_simnpo(lf, fl, cfg["beta"], cfg["gamma"]), 1.0)]
    elif method == "wga":
        out = [(p_wga(lf, fl, cfg["beta"]), cfg["forget_weight"])]
    elif method == "satimp":
        out = [(p_satimp(lf, fl, cfg["beta1"], cfg["beta2"]), cfg["forget_weight"])]
    elif method == "ce_u":
        out = [(p_ce_u(lf, fl), cfg["forget_weight"])]
    elif method == "undial":
        out = [
            (
                p_undial(lf, ref_logits_of(model, ref, forget), fl, cfg["gamma"]),
                cfg["forget_weight"],
            )
        ]
    else:
        raise AssertionError(method)
    if cfg["retain_weight"] > 0:
        out.append((h_nll(logits_of(model, retain), retain["labels"]), cfg["retain_weight"]))
    return out


STEP_CASES = [
    ("simnpo", {}),
    ("simnpo", {"beta": 1.0, "gamma": 0.5, "retain_weight": 2.0}),
    ("wga", {}),
    ("wga", {"beta": 0.5, "retain_weight": 0.0}),
    ("satimp", {}),
    ("ce_u", {}),
    ("ce_u", {"forget_weight": 0.5, "retain_weight": 0.0}),
    ("undial", {}),
    ("undial", {"gamma": 2.0, "retain_weight": 1.0}),
]


@pytest.mark.parametrize(
    "method,opts",
    STEP_CASES,
    ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o in STEP_CASES],
)
def test_step_matches_handwritten(method, opts):
    model, ref, forget, retain = setup("llama")
    hand = copy.deepcopy(model)
    hand_params = [p for p in hand.parameters() if p.requires_grad]
    terms = handwritten(method, opts, hand, ref, forget, retain)
    total = sum(w * loss for loss, w in terms)
    d = torch.autograd.grad(total, hand_params, allow_unused=True)
    d = [torch.zeros_like(p) if g is None else g for p, g in zip(hand_params, d)]

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    unlearner = MultiObjectiveUnlearner(
        model, torch.optim.SGD(params, lr=LR), method, ref_model=ref, **opts
    )
    stats = unlearner.step(forget=forget, retain=retain)
    for p, b, dq in zip(params, before, d):
        assert_update(p.detach(), b, dq, TOL)
    names = [k[5:] for k in stats if k.startswith("loss/")]
    assert len(names) == len(terms)
    for name, (loss, _) in zip(names, terms):
        assert stats[f"loss/{name}"] == pytest.approx(float(loss), rel=max(TOL, 1e-7))


def test_registered_and_configurable():
    for name in ("simnpo", "wga", "satimp", "ce_u", "undial"):
        assert name in available_methods()
        assert make_method(name).name == name
    assert make_method("undial").needs_ref and not make_method("simnpo").needs_ref
    assert not make_method("simnpo").needs_retain and make_method("wga").needs_retain
    with pytest.raises(ValueError, match="retain_weight"):
        make_method("wga", retain_weight=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        make_method("undial", gamma=float("nan"))
    with pytest.raises(TypeError, match="unknown option"):
        make_method("satimp", beta=1.0)
