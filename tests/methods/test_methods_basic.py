"""Every method's ``step()`` against a hand-written pure-PyTorch step, in float64.

The hand-written step computes each loss with ``log_softmax`` on ``logits[:, :-1]`` /
``labels[:, 1:]``, each gradient with ``torch.autograd.grad``, and combines them as
each method's docstring says (min-norm by scipy's NNLS, tests/hard_grams.py). With plain SGD as the
wrapped optimizer the update is exactly ``-lr * d``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.hard_grams import nnls_min_norm
from tests.methods.step_fixtures import LR, TOL, assert_update, logits_of, ref_logits_of, setup
from unlearnopt.unlearner import MultiObjectiveUnlearner

# -- the hand-written methods ----------------------------------------------------------------------


def token_logp(logits, labels):
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    y = labels[:, 1:]
    mask = y != -100
    tok = lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return tok, mask, lp


def h_nll(logits, labels):
    tok, mask, _ = token_logp(logits, labels)
    return -tok[mask].mean()


def h_ga(logits, labels):
    return -h_nll(logits, labels)


def h_uce(logits, labels, alpha=0.5):
    tok, mask, _ = token_logp(logits, labels)
    return -torch.log1p(-alpha * tok.exp())[mask].mean()


def h_kl(logits, ref_logits, labels):
    _, mask, lp = token_logp(logits, labels)
    lq = F.log_softmax(ref_logits[:, :-1].double(), dim=-1)
    return (lq.exp() * (lq - lp)).sum(-1)[mask].mean()


def h_npo(logits, ref_logits, labels, beta=0.1):
    tok, mask, _ = token_logp(logits, labels)
    rtok, _, _ = token_logp(ref_logits, labels)
    ratio = (tok * mask).sum(1) - (rtok * mask).sum(1)
    return (2 / beta * F.softplus(beta * ratio)).mean()


def handwritten_losses(method, opts, model, ref, forget, retain):
    """[(name, loss)] in the method's order."""
    lf = logits_of(model, forget)
    if method == "ga":
        return [h_ga(lf, forget["labels"])]
    lr_ = logits_of(model, retain)
    if method == "grad_diff":
        return [h_ga(lf, forget["labels"]), h_nll(lr_, retain["labels"])]
    if method == "ga_kl":
        return [
            h_ga(lf, forget["labels"]),
            h_kl(lr_, ref_logits_of(model, ref, retain), retain["labels"]),
        ]
    if method == "npo":
        out = [
            h_npo(lf, ref_logits_of(model, ref, forget), forget["labels"], opts.get("beta", 0.1))
        ]
        if opts.get("retain_weight", 0) > 0:
            out.append(h_nll(lr_, retain["labels"]))
        return out
    if method == "mollm":
        return [
            h_uce(lf, forget["labels"], opts.get("alpha", 0.5)),
            h_kl(lr_, ref_logits_of(model, ref, retain), retain["labels"]),
            h_nll(lr_, retain["labels"]),
        ]
    raise AssertionError(method)


def handwritten_direction(method, opts, model, ref, forget, retain, params):
    losses = handwritten_losses(method, opts, model, ref, forget, retain)
    grads = []
    losses_out = [loss.detach() for loss in losses]
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
    if method != "mollm":
        weights = {
            "ga": [1.0],
            "grad_diff": [1.0, opts.get("retain_weight", 1.0)],
            "ga_kl": [1.0, opts.get("kl_weight", 1.0)],
            "npo": [1.0, opts.get("retain_weight", 0.0)],
        }[method]
        d = [sum(w * g[q] for w, g in zip(weights, grads)) for q in range(len(params))]
        return d, losses_out, grads, None
    normalize = opts.get("normalize", "mean")
    sit_out = opts.get("sit_out", 1e-3)
    per_tensor = opts.get("granularity", "global") == "per_tensor"
    problems = [list(range(len(params)))] if not per_tensor else [[q] for q in range(len(params))]
    d = [None] * len(params)
    scales_all = []
    for tensors in problems:
        k = len(grads)
        gram = torch.tensor(
            [
                [sum(float((grads[i][q] * grads[j][q]).sum()) for q in tensors) for j in range(k)]
                for i in range(k)
            ],
            dtype=torch.float64,
        )
        norms = gram.diagonal().clamp(min=0).sqrt()
        active = norms >= sit_out * norms.max()
        s = torch.ones(k, dtype=torch.float64)
        nz = norms > 0
        if normalize == "unit":
            s[nz] = 1 / norms[nz]
        elif normalize == "mean":
            s[nz] = norms[active].mean() / norms[nz]
        g_hat = gram * s[:, None] * s[None, :]
        idx = active.nonzero().flatten()
        w = torch.zeros(k, dtype=torch.float64)
        w[idx] = torch.from_numpy(nnls_min_norm(g_hat[idx][:, idx].numpy()))
        for q in tensors:
            d[q] = sum(w[i] * s[i] * grads[i][q] for i in range(k))
        scales_all.append((w, s, active))
    return d, losses_out, grads, scales_all


def check_step(kind, method, opts, dtype=torch.float64):
    model, ref, forget, retain = setup(kind, dtype)
    hand_model = copy.deepcopy(model)
    hand_params = [p for p in hand_model.parameters() if p.requires_grad]
    d, losses, grads, extra = handwritten_direction(
        method, opts, hand_model, ref, forget, retain, hand_params
    )
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=LR)
    unlearner = MultiObjectiveUnlearner(model, opt, method, ref_model=ref, **opts)
    stats = unlearner.step(forget=forget, retain=retain)
    for p, b, dq in zip(params, before, d):
        assert_update(p.detach(), b, dq, TOL)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    names = [k[5:] for k in stats if k.startswith("loss/")]
    assert len(names) == len(losses)
    for name, loss in zip(names, losses):
        assert abs(stats[f"loss/{name}"] - float(loss)) <= max(TOL, 1e-7) * (1 + abs(float(loss)))
    for name, g in zip(names, grads):
        norm = float(torch.sqrt(sum((t * t).sum() for t in g)))
        assert abs(stats[f"grad_norm/{name}"] - norm) <= max(TOL, 1e-6) * (1 + norm)
    return stats, d, grads, extra


METHOD_CASES = [
    ("ga", {}),
    ("grad_diff", {}),
    ("grad_diff", {"retain_weight": 0.3}),
    ("ga_kl", {}),
    ("npo", {}),
    ("npo", {"retain_weight": 1.0, "beta": 0.5}),
    ("mollm", {}),
    ("mollm", {"normalize": "unit"}),
    ("mollm", {"normalize": "none"}),
    ("mollm", {"granularity": "per_tensor"}),
]


@pytest.mark.parametrize(
    "method,opts",
    METHOD_CASES,
    ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o in METHOD_CASES],
)
def test_step_matches_handwritten_float64(method, opts):
    stats, *_ = check_step("llama", method, opts)
    assert stats["skipped"] == 0.0 and stats["lr"] == LR


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "llava", "lora"])
def test_step_matches_handwritten_other_models(kind):
    method = "mollm"
    stats, *_ = check_step(kind, method, {})
    assert all(np.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("normalize", ["mean", "none"])
def test_mollm_direction_is_common_descent(normalize):
    stats, d, grads, extra = check_step("llama", "mollm", {"normalize": normalize})
    ((_, s, _),) = extra
    dd = float(sum((t * t).sum() for t in d))
    assert dd > 0
    for i, g in enumerate(grads):
        inner = float(sum((a * b).sum() for a, b in zip(d, g)))
        # <d, ĝ_i> >= ||d||^2 with ĝ_i = s_i g_i (s = 1 for normalize="none").
        assert inner * float(s[i]) >= dd * (1 - 1e-7) - 1e-12
        assert inner > 0
    assert (
        abs(sum(stats[f"weight/{n}"] for n in ("forget_uce", "retain_kl", "retain_nll")) - 1) < 1e-6
    )


def test_mollm_kl_sits_out_at_the_first_step():
    # theta == reference: the KL gradient is 0 (rounding noise), so it sits out.
    model, ref, forget, retain = setup("llama", perturb=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = MultiObjectiveUnlearner(model, opt, "mollm", ref_model=ref).step(forget, retain)
    assert stats["sat_out/retain_kl"] == 1.0 and stats["weight/retain_kl"] == 0.0
    assert stats["sat_out/forget_uce"] == 0.0 and stats["sat_out/retain_nll"] == 0.0
    assert abs(stats["weight/forget_uce"] + stats["weight/retain_nll"] - 1) < 1e-6


def test_lora_reference_is_the_model_with_adapters_disabled():
    model, _, forget, retain = setup("lora")
    hand = copy.deepcopy(model)
    with torch.no_grad(), hand.disable_adapter():
        base = logits_of(hand, retain)
    expected = h_kl(logits_of(hand, retain), base, retain["labels"]).detach()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    unlearner = MultiObjectiveUnlearner(model, torch.optim.SGD(params, lr=0.1), "mollm")
    stats = unlearner.step(forget=forget, retain=retain)
    assert stats["loss/retain_kl"] > 1e-6
    assert abs(stats["loss/retain_kl"] - float(expected)) < 1e-6 * float(expected)
    ref = unlearner.ref_forward(retain)
    assert not ref.requires_grad
    # The adapters are active again after the reference pass.
    assert model.training
