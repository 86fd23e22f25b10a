"""IdkDPO: the DPO loss against a plain-PyTorch formula, auxiliary batches, the fact batches
with shipped "I don't know" answers, and ``step()`` against a hand-written step (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.methods.step_fixtures import LR, TOL, assert_update, logits_of, ref_logits_of, setup
from tests.tiny_models import make_batch
from unlearnopt.contract import AUX_PREFIX, ObjectiveContext, attach_aux
from unlearnopt.data import idk_answers
from unlearnopt.methods import make_method
from unlearnopt.methods.idk_dpo import idk_answer_for
from unlearnopt.objectives import dpo_loss
from unlearnopt.unlearner import MultiObjectiveUnlearner


def seq_logp(logits, labels):
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    y = labels[:, 1:]
    mask = y != -100
    return (lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(1)


def p_dpo(lw, rw, yw, ll, rl, yl, beta):
    r = (seq_logp(lw, yw) - seq_logp(rw, yw)) - (seq_logp(ll, yl) - seq_logp(rl, yl))
    return (-(2 / beta) * F.logsigmoid(beta * r)).mean()


def test_dpo_loss_matches_plain_formula_and_hand_value():
    gen = torch.Generator().manual_seed(0)
    lw, rw = (torch.randn(2, 5, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    ll, rl = (torch.randn(2, 4, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    yw, yl = torch.randint(0, 6, (2, 5), generator=gen), torch.randint(0, 6, (2, 4), generator=gen)
    yw[:, :2] = -100
    yl[:, :1] = -100
    lw.requires_grad_()
    a = dpo_loss(lw, rw, yw, ll, rl, yl, 0.3)
    b = p_dpo(lw, rw, yw, ll, rl, yl, 0.3)
    torch.testing.assert_close(a, b, rtol=max(TOL, 1e-10), atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(a, lw)[0],
        torch.autograd.grad(b, lw)[0],
        rtol=max(TOL, 1e-9),
        atol=1e-12,
    )
    # trained == reference: r = 0, loss = (2 / beta) log 2.
    same = dpo_loss(rw, rw, yw, rl, rl, yl, 0.5)
    assert float(same) == pytest.approx(4 * torch.log(torch.tensor(2.0)).item())
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(lw, rw, yw, ll, rl, yl, 0.0)
    with pytest.raises(ValueError, match="one preferred"):
        dpo_loss(lw, rw, yw, ll[:1], rl[:1], yl[:1])


def test_aux_batches_travel_but_never_reach_the_model():
    main, other = make_batch("llama", seed=1), make_batch("llama", seq=6, seed=2)
    batch = attach_aux(main, "idk", other)
    assert all(k in batch for k in (f"{AUX_PREFIX}idk_input_ids", f"{AUX_PREFIX}idk_labels"))
    seen = []
    ctx = ObjectiveContext(batch, "forget", lambda b, k: seen.append(sorted(b)) or b["labels"])
    sub = ctx.aux("idk")
    assert torch.equal(sub.labels, other["labels"]) and ctx.aux("idk") is sub
    sub.logits  # noqa: B018  (the forward runs on the auxiliary batch's own entries)
    assert seen == [sorted(other)]
    with pytest.raises(ValueError, match="aux_nope_labels"):
        ctx.aux("nope")
    with pytest.raises(ValueError, match="pair up"):
        attach_aux(main, "idk", make_batch("llama", batch=3))


def test_shipped_idk_answers_and_choice():
    answers = idk_answers()
    assert len(answers) >= 10 and len(set(answers)) == len(answers)
    assert idk_answer_for("capital/France", answers) == idk_answer_for("capital/France", answers)
    assert len({idk_answer_for(f"f{i}", answers) for i in range(50)}) > 5


@pytest.mark.parametrize(
    "opts", [{}, {"beta": 0.5, "retain_weight": 0.0}, {"forget_weight": 2.0, "retain_weight": 0.5}]
)
def test_step_matches_handwritten(opts):
    model, ref, forget_l, retain = setup("llama")
    forget_w = make_batch("llama", batch=3, seq=7, seed=9, dtype=torch.float64)
    forget = attach_aux(forget_l, "idk", forget_w)
    cfg = make_method("idk_dpo", **opts).config
    hand = copy.deepcopy(model)
    total = cfg["forget_weight"] * p_dpo(
        logits_of(hand, forget_w),
        ref_logits_of(hand, ref, forget_w),
        forget_w["labels"],
        logits_of(hand, forget_l),
        ref_logits_of(hand, ref, forget_l),
        forget_l["labels"],
        cfg["beta"],
    )
    if cfg["retain_weight"] > 0:
        lp = F.log_softmax(logits_of(hand, retain)[:, :-1].double(), -1)
        y = retain["labels"][:, 1:]
        m = y != -100
        tok = lp.gather(-1, y.clamp(min=0)[..., None])[..., 0]
        total = total - cfg["retain_weight"] * tok[m].mean()
    hp = list(hand.parameters())
    d = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(hp, torch.autograd.grad(total, hp, allow_unused=True))
    ]
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    unlearner = MultiObjectiveUnlearner(
        model, torch.optim.SGD(params, lr=LR), "idk_dpo", ref_model=ref, **opts
    )
    unlearner.step(forget=forget, retain=retain)
    for p, b, dq in zip(params, before, d):
        assert_update(p.detach(), b, dq, TOL)


def test_accumulation_splits_the_pairs_together():
    model, ref, forget_l, retain = setup("llama")
    forget = attach_aux(
        forget_l, "idk", make_batch("llama", batch=3, seq=7, seed=9, dtype=torch.float64)
    )
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    for m, acc in ((one, 1), (two, 2)):
        MultiObjectiveUnlearner(
            m, torch.optim.SGD(m.parameters(), lr=LR), "idk_dpo", ref_model=ref, accumulate=acc
        ).step(forget=forget, retain=retain)
    # The unlearner's micro-batch shares are float32, hence the float32-level tolerance;
    # mispaired rows would differ at O(step).
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fact_batches_attach_idk_alternates():
    from unlearnopt.data import Fact

    calls = []

    def encode(prompts, answers):
        calls.append(list(answers))
        n = len(prompts)
        return {
            "input_ids": torch.zeros(n, 4, dtype=torch.long),
            "labels": torch.zeros(n, 4, dtype=torch.long),
        }

    facts = [
        Fact("The capital of France is", "Paris", id="capital/France"),
        Fact("The capital of Peru is", "Lima", id="capital/Peru"),
    ]
    fb, rb = make_method("idk_dpo").fact_batches(
        facts, facts, encode=encode, tokenizer=None, vocab_size=10
    )
    assert calls[0] == ["Paris", "Lima"] and rb is not None
    assert calls[-1] == [idk_answer_for(f.id, idk_answers()) for f in facts]
    assert "aux_idk_labels" in fb
