"""PULSE end to end on a tiny random Llama with a word-level tokenizer (no download).

The tiny model first learns a handful of made-up facts (so the "pretrained" phase has known
facts to probe), then the protocol runs ga and mollm over two sequential requests.
"""

from __future__ import annotations

import copy
import functools
import json
import operator

import pytest
import torch

from tests.pulse_fixtures import (
    COLOURS,
    NEUTRAL,
    tiny_facts,
    tiny_fictitious,
    tiny_pulse_config,
)
from unlearnopt.data import Fact


def test_pulse_end_to_end_writes_report_and_plots(trained_tiny, tmp_path):
    from unlearnopt.eval.pulse import run_pulse

    model, tok = trained_tiny
    snapshot = copy.deepcopy(model.state_dict())
    report = run_pulse(
        model,
        tok,
        tiny_pulse_config(phases=("pretrained", "finetuned")),
        tmp_path,
        real_facts=tiny_facts(),
        fictitious=tiny_fictitious(),
        neutral=NEUTRAL,
        log=lambda s: None,
    )
    # the caller's model is left untouched: every method works on its own copy
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    for phase in ("pretrained", "finetuned"):
        data = report["phases"][phase]
        assert data["before"]["forget_acc"] == 1.0  # only known facts are forgotten
        for method in ("ga", "mollm"):
            ends = [r for r in data["methods"][method] if r["point"] == "end"]
            assert [r["request"] for r in ends] == [1, 2]
            for r in ends:
                assert set(r["metrics"]) >= {
                    "forget_acc",
                    "general_acc",
                    "retain_acc",
                    "neighbour_acc",
                    "ppl",
                    "diversity",
                    "mia_auc",
                }
        names = [row["name"] for row in data["summary"]]
        assert names[0] == "before" and "ga@end" in names and "mollm@end" in names
    split = report["phases"]["pretrained"]["split"]
    forget_ids = [i for r in split["forget_requests"] for i in r]
    assert len(forget_ids) == 4 and len(set(forget_ids)) == 4
    # neighbours share a relation with some forget fact and are never trained on
    rels = {i.split("/")[0] for i in forget_ids}
    assert split["neighbour"] and all(i.split("/")[0] in rels for i in split["neighbour"])
    assert not set(split["neighbour"]) & (set(split["retain"]) | set(forget_ids))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["phases"]["pretrained"]["summary"][0]["name"] == "before"
    for name in (
        "pretrained_metrics.png",
        "pretrained_table.png",
        "finetuned_metrics.png",
        "pretrained_table.txt",
    ):
        assert (tmp_path / name).stat().st_size > 0


def _ga_records(trained_tiny, **kw) -> list[dict]:
    from unlearnopt.eval.pulse import run_pulse

    model, tok = trained_tiny
    report = run_pulse(
        model,
        tok,
        tiny_pulse_config(methods=("ga",), lr=5e-2, **kw),
        None,
        real_facts=tiny_facts(),
        fictitious=tiny_fictitious(),
        neutral=NEUTRAL,
        log=lambda s: None,
    )
    return report["phases"]["pretrained"]["methods"]["ga"]


def test_ga_at_high_lr_forgets_and_target_is_recorded(trained_tiny):
    recs = _ga_records(trained_tiny, steps=6, stop_at_target=True)
    at = [r for r in recs if r["point"] == "at_target"]
    assert at, "GA at lr 5e-2 should forget a 2-fact request within 6 steps"
    assert all(r["metrics"]["forget_acc"] == 0.0 or r["request"] > 1 for r in at)
    ends = [r for r in recs if r["point"] == "end"]
    # with stop_at_target a request ends at the step it reached the target
    assert all(
        e["request_step"] == e["steps_to_target"] for e in ends if e["steps_to_target"] is not None
    )


def test_run_on_past_the_target_measures_both_points(trained_tiny):
    recs = _ga_records(trained_tiny, steps=4, stop_at_target=False)
    ends = [r for r in recs if r["point"] == "end"]
    assert [e["request_step"] for e in ends] == [4, 4]  # the whole budget, every request
    for at in (r for r in recs if r["point"] == "at_target"):
        end = next(e for e in ends if e["request"] == at["request"])
        assert at["request_step"] == end["steps_to_target"] <= end["request_step"]


def test_requests_replay_relapsed_facts_with_a_fresh_optimizer(trained_tiny, monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    from unlearnopt import training
    from unlearnopt.eval import pulse
    from unlearnopt.eval.pulse import protocol

    model, tok = trained_tiny
    facts = tiny_facts()
    batches, optimizers = [], []

    def fake_step(self, forget):  # record what each step would train on; change nothing
        batches.append([f.id for f in forget])
        optimizers.append(self.optimizer)
        return {}

    def fake_score(model, tokenizer, prompts, answers, **kw):  # facts[0] stays forgotten
        return SimpleNamespace(exact=np.array([p != facts[0].prompt for p in prompts]))

    monkeypatch.setattr(training.UnlearningRun, "step", fake_step)
    monkeypatch.setattr(protocol, "score_answers", fake_score)
    split = pulse.Split(facts[:4], facts[8:12], facts[4:6], [], [facts[:2], facts[2:4]])
    work = copy.deepcopy(model)
    for replay, fresh in ((True, True), (False, False)):
        batches.clear()
        optimizers.clear()
        cfg = tiny_pulse_config(
            methods=("ga",),
            steps=2,
            replay=replay,
            fresh_optimizer=fresh,
            method_options={"ga": {"lr": 0.125}},
        )
        recs = pulse.run_method_sequence(
            work, None, tok, "ga", split, cfg, NEUTRAL, NEUTRAL[:2], log=lambda s: None
        )
        assert [r["request_step"] for r in recs] == [2, 2]  # never at the target
        first, second = [f.id for f in facts[:2]], [f.id for f in facts[2:4]]
        # request 2 replays facts[1] (answered again), not facts[0] (still forgotten)
        assert batches == [first, first] + [second + first[1:] if replay else second] * 2
        assert recs[1]["replayed_facts"] == (1 if replay else 0)
        assert (optimizers[2] is not optimizers[1]) == fresh
        assert optimizers[0] is optimizers[1]
        assert all(o.param_groups[0]["lr"] == 0.125 for o in optimizers)  # the method's own lr


def test_forget_facts_have_answers_of_their_own():
    from unlearnopt.eval.pulse import PulseConfig, split_pretrained

    known = [
        Fact(
            prompt=f"{c} is on the continent of",
            answer="Europe",
            relation="continent",
            id=f"continent/{c}",
        )
        for c in ("France", "Norway", "Spain", "Italy")
    ]
    known += [
        Fact(
            prompt=f"{c} is on the continent of",
            answer=a,
            relation="continent",
            id=f"continent/{c}",
        )
        for c, a in (("Chad", "Africa"), ("Peru", "South America"))
    ]
    known += [
        Fact(prompt=f"the colour of {s} is", answer=a, relation="colour", id=f"colour/{s}")
        for s, a in COLOURS
    ]
    for seed in range(5):
        split = split_pretrained(known, [], PulseConfig(forget_size=6, requests=2, seed=seed))
        answers = [f.answer for f in split.forget]
        assert "Europe" not in answers and len(answers) == 6
        assert {"Africa", "South America"} & set(answers)  # continents are still forgotten


def test_split_requests_and_config_validation():
    from unlearnopt.eval.pulse import PulseConfig, split_requests

    chunks = split_requests(list(range(7)), 3)
    assert [len(c) for c in chunks] == [2, 3, 2] and functools.reduce(
        operator.iadd, chunks, []
    ) == list(range(7))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        PulseConfig(methods=("nope",)).validate()
    with pytest.raises(ValueError, match="forget_size"):
        PulseConfig(forget_size=2, requests=5).validate()
    with pytest.raises(ValueError, match="unknown phase"):
        PulseConfig(phases=("later",)).validate()
    with pytest.raises(ValueError, match=r"method_options\['siu'\]\['lr'\] must be a positive"):
        PulseConfig(method_options={"siu": {"lr": 0}}).validate()


def test_method_settings_precedence():
    from unlearnopt.eval.pulse import TUNED_METHOD_OPTIONS, PulseConfig, method_settings

    cfg = PulseConfig(lr=2e-5, method_options={"siu": {"beta": 1.5}, "npo": {"lr": 7e-6}})
    assert method_settings(cfg, "ga") == {"lr": 2e-5}
    assert method_settings(cfg, "npo") == {"lr": 7e-6}
    assert method_settings(cfg, "siu") == {**TUNED_METHOD_OPTIONS["siu"], "beta": 1.5}
    cfg.method_options["siu"]["lr"] = 1e-6  # the caller's options win
    assert method_settings(cfg, "siu")["lr"] == 1e-6


def test_siu_substitutes_are_invented_per_fact():
    from unlearnopt.methods.siu import SUBSTITUTES, substitute_answer

    facts = tiny_facts()
    words = [substitute_answer(f) for f in facts]
    assert words == [substitute_answer(f) for f in tiny_facts()]  # stable across calls
    assert set(words) <= set(SUBSTITUTES) and len(set(words)) > 3
    assert not {f.answer for f in facts} & set(words)


def test_siu_batch_masks(trained_tiny):
    from unlearnopt.eval.metrics import encode_qa
    from unlearnopt.methods import get_method

    _, tok = trained_tiny
    facts = tiny_facts()
    b, retain = get_method("siu")().fact_batches(
        facts[:2],
        facts[2:5],
        encode=lambda p, a: encode_qa(tok, p, a),
        tokenizer=tok,
        vocab_size=len(tok),
    )
    assert retain is None  # aim 4 rows are the retain signal
    assert b["token_mask"].shape == b["labels"].shape
    assert not b["token_mask"][:2].any()  # substitute targets: no KL
    assert torch.equal(b["token_mask"][2:], b["labels"][2:] != -100)
    forgotten = tok(" " + facts[0].answer, add_special_tokens=False)["input_ids"]
    assert not b["vocab_mask"][forgotten].any() and b["vocab_mask"].sum() == len(tok) - 2
