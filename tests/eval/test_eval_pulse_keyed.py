"""PULSE serving requests with the keyed edit (``--methods keyed``): the edit touches one
layer, forgets, and its key statistics never see a forget or neighbour fact."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.pulse_fixtures import NEUTRAL, tiny_facts, tiny_fictitious, tiny_pulse_config


def _split(seed=0):
    from unlearnopt.eval.pulse import split_focused

    cfg = tiny_pulse_config(focus="relation", forget_size=2, requests=2, retain_size=8, seed=seed)
    return split_focused(tiny_facts(), tiny_fictitious(), cfg), cfg


def test_key_texts_hold_no_forget_or_neighbour_prompt():
    from unlearnopt.eval.pulse import key_texts_for

    split, _ = _split()
    texts = key_texts_for(split, tiny_fictitious() + list(split.retain))
    held = {t for f in (*split.forget, *split.neighbour) for t in (f.prompt, *f.paraphrases)}
    assert texts and not held & set(texts)
    for f in (*split.retain, *tiny_fictitious()):
        assert f.prompt in texts and set(f.paraphrases) <= set(texts)
    assert len(texts) == len(set(texts))  # a retain fact also among the fictitious: once


def test_keyed_requests_edit_one_layer_and_forget(trained_tiny):
    from unlearnopt.eval.pulse import key_texts_for, run_method_sequence

    base, tok = trained_tiny
    split, cfg = _split()
    cfg = tiny_pulse_config(
        methods=("keyed",),
        focus="relation",
        forget_size=2,
        requests=2,
        steps=3,
        method_options={"keyed": {"layer": 0, "inner_steps": 200, "inner_lr": 2.0}},
    )
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recs = run_method_sequence(
        model,
        None,
        tok,
        "keyed",
        split,
        cfg,
        NEUTRAL,
        NEUTRAL[:2],
        log=lambda _: None,
        key_texts=key_texts_for(split, tiny_fictitious()),
    )
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    ends = [r for r in recs if r["point"] == "end"]
    assert [e["request"] for e in ends] == [1, 2]
    assert ends[-1]["metrics"]["forget_acc"] < 1.0  # forget facts went from all answered
    assert ends[0]["last_stats"]["update_norm"] > 0
    assert all(p.grad is None for p in model.parameters())


def test_keyed_in_run_pulse_and_its_options_are_checked(trained_tiny):
    from unlearnopt.editing import KeyedEditRun
    from unlearnopt.eval.pulse import run_pulse

    base, tok = trained_tiny
    cfg = tiny_pulse_config(methods=("ga", "keyed"), steps=2)
    report = run_pulse(
        base,
        tok,
        cfg,
        real_facts=tiny_facts(),
        fictitious=tiny_fictitious(),
        neutral=NEUTRAL,
        log=lambda _: None,
    )
    phase = report["phases"]["pretrained"]
    assert set(phase["methods"]) == {"ga", "keyed"}
    assert "keyed@end" in phase["verdicts"]
    with pytest.raises(ValueError, match="layer must be"):
        KeyedEditRun.check_options(layer=-1)
    with pytest.raises(ValueError, match="inner_lr must be"):
        KeyedEditRun.check_options(inner_lr=0)
    with pytest.raises(ValueError, match="protect_weight must be"):
        KeyedEditRun.check_options(protect_weight=-1.0)
    with pytest.raises(TypeError, match="unknown option"):
        KeyedEditRun.check_options(beta=1)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\)"):
        KeyedEditRun(copy.deepcopy(base), tok, ["the capital of Aland is"], layer=5)


def test_protected_keys_move_less(trained_tiny):
    from unlearnopt.editing import KeyedEditRun, key_texts, subject_keys

    base, tok = trained_tiny
    facts = tiny_facts()
    forget, protect = facts[:2], facts[2:8]  # capitals: the protected ones share the relation
    texts = key_texts(tiny_fictitious(), exclude=forget)
    moved = {}
    for weight in (0.0, 1e3):
        model = copy.deepcopy(base)
        run = KeyedEditRun(
            model, tok, texts, layer=0, inner_steps=50, protect=protect, protect_weight=weight
        )
        w0 = run.module.weight.detach().clone()
        keys = subject_keys(model, tok, protect, run.module)
        run.step(forget)
        dw = (run.module.weight.detach() - w0).double()
        moved[weight] = float((keys @ dw.T).norm() / dw.norm())
    assert moved[1e3] < 0.1 * moved[0.0], moved
