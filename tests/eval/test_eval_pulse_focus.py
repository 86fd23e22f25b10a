"""Focused PULSE scenarios on tiny inputs: requests concentrated on one relation or one subject,
held-out neighbours of the same relations, the retain sampler that includes same-relation
facts, and the one-shot vs split comparison."""

from __future__ import annotations

import pytest

from tests.pulse_fixtures import NEUTRAL, tiny_facts, tiny_fictitious, tiny_pulse_config
from unlearnopt.data import Fact


def _ids(facts) -> set[str]:
    return {f.id for f in facts}


def _check_disjoint(split) -> None:
    forget, retain, neighbour = _ids(split.forget), _ids(split.retain), _ids(split.neighbour)
    assert len(forget) == len(split.forget)
    assert not forget & retain and not forget & neighbour and not retain & neighbour
    assert [f.id for r in split.requests for f in r] == [f.id for f in split.forget]


@pytest.mark.parametrize("seed", range(4))
def test_relation_focus_one_relation_per_request(seed):
    from unlearnopt.eval.pulse import PulseConfig, split_focused

    cfg = PulseConfig(focus="relation", forget_size=4, requests=2, retain_size=20, seed=seed)
    split = split_focused(tiny_facts(), tiny_fictitious(), cfg)
    _check_disjoint(split)
    assert [len(r) for r in split.requests] == [2, 2]
    rels = [{f.relation for f in r} for r in split.requests]
    assert all(len(r) == 1 for r in rels)
    assert rels[0] != rels[1]  # two relations available: a different one per request
    forgotten = set().union(*rels)
    # neighbours: held-out facts of the forgotten relations; retain includes others of them
    assert split.neighbour and {f.relation for f in split.neighbour} <= forgotten
    assert {f.relation for f in split.retain} & forgotten
    assert len(split.nonmember) == min(cfg.nonmember_size, len(tiny_fictitious()))


def test_relation_focus_reuses_a_relation_and_forgets_only_own_answers():
    from unlearnopt.eval.pulse import PulseConfig, split_focused

    facts = tiny_facts()[:8]  # capitals only
    facts.append(
        Fact(prompt="the capital of Zed is", answer="Bormo", relation="capital", id="capital/Zed")
    )  # shares its answer with capital/Aland
    cfg = PulseConfig(focus="relation", forget_size=4, requests=2, retain_size=20)
    split = split_focused(facts, [], cfg)
    _check_disjoint(split)
    assert {f.relation for f in split.forget} == {"capital"}
    assert not {"Bormo"} & {f.answer for f in split.forget}
    with pytest.raises(ValueError, match="no relation has 4 more known facts"):
        split_focused(facts, [], PulseConfig(focus="relation", forget_size=8, requests=2))


@pytest.mark.parametrize("seed", range(4))
def test_subject_focus_forgets_every_fact_of_one_subject(seed):
    from unlearnopt.eval.pulse import PulseConfig, split_focused

    people = tiny_fictitious()
    # a third fact for one person whose answer another person's fact shares
    people.append(
        Fact(
            prompt="Zarn lives in",
            answer="violin",
            relation="home",
            id="fict/Zarn/home",
            subject="Zarn",
            entity="Zarn",
        )
    )
    cfg = PulseConfig(focus="subject", requests=2, retain_size=20, seed=seed)
    split = split_focused(people, [], cfg)
    _check_disjoint(split)
    for request in split.requests:
        subjects = {f.entity for f in request}
        assert len(subjects) == 1
        subject = subjects.pop()
        assert _ids(request) == _ids(f for f in people if f.entity == subject)
    forgotten = {f.entity for f in split.forget}
    answers = {f.answer for f in split.forget}
    assert split.neighbour and not {f.entity for f in split.neighbour} & forgotten
    assert {f.relation for f in split.neighbour} <= {f.relation for f in split.forget}
    # a held-out subject is never also a retained subject; no kept fact shares a forgotten answer
    assert not {f.entity for f in split.neighbour} & {f.entity for f in split.retain}
    assert not answers & {f.answer for f in split.retain + split.neighbour}
    assert len(split.requests) == 2


def test_focus_is_validated():
    from unlearnopt.eval.pulse import PulseConfig

    with pytest.raises(ValueError, match="unknown focus 'topic'"):
        PulseConfig(focus="topic").validate()


def test_retain_sampler_takes_same_relation_facts():
    from tests.pulse_fixtures import all_texts, tiny_llama, tiny_tokenizer
    from unlearnopt.training import UnlearningRun

    tok = tiny_tokenizer(all_texts())
    facts = tiny_facts()
    capitals, colours = facts[:8], facts[8:]
    retain = capitals[2:6] + colours
    # False: uniform; True: half; a share: round(4 * share) (at least one)
    for same, expect in ((False, None), (True, 2), (0.75, 3), (0.1, 1), (1.0, 4)):
        run = UnlearningRun(
            tiny_llama(len(tok)),
            tok,
            "ga",
            None,
            retain,
            lr=1e-3,
            retain_batch_size=4,
            seed=0,
            retain_same_relation=same,
        )
        counts = []
        for _ in range(20):
            batch = run.retain_batch(capitals[:2])
            assert len(batch) == 4 and len(_ids(batch)) == 4 and _ids(batch) <= _ids(retain)
            counts.append(sum(f.relation == "capital" for f in batch))
        if expect is not None:
            assert set(counts) == {expect}
        else:
            assert len(set(counts)) > 1  # uniform draws: the share varies
    # few other facts: the batch fills up with more of the same relation
    run = UnlearningRun(
        tiny_llama(len(tok)),
        tok,
        "ga",
        None,
        capitals[2:8] + colours[:1],
        lr=1e-3,
        retain_batch_size=4,
        seed=0,
        retain_same_relation=True,
    )
    batch = run.retain_batch(capitals[:2])
    assert len(batch) == 4 and sum(f.relation == "capital" for f in batch) == 3


@pytest.mark.parametrize("share", [-0.1, 1.5, "half", float("nan")])
def test_same_relation_share_must_lie_in_0_1(share):
    from unlearnopt.training import same_relation_share

    with pytest.raises(ValueError, match=r"retain_same_relation must be a share in \[0, 1\]"):
        same_relation_share(share)


def test_focused_pulse_with_one_shot_comparison(trained_tiny, tmp_path):
    from unlearnopt.eval.pulse import run_pulse

    model, tok = trained_tiny
    cfg = tiny_pulse_config(
        methods=("ga",),
        focus="relation",
        compare_one_shot=True,
        retain_same_relation=True,
        lr=5e-2,
        steps=2,
    )
    report = run_pulse(
        model,
        tok,
        cfg,
        tmp_path,
        real_facts=tiny_facts(),
        fictitious=tiny_fictitious(),
        neutral=NEUTRAL,
        log=lambda s: None,
    )
    data = report["phases"]["pretrained"]
    rels = [{i.split("/")[0] for i in r} for r in data["split"]["forget_requests"]]
    assert all(len(r) == 1 for r in rels)
    one = data["one_shot"]
    assert [row["name"] for row in one["summary"]] == ["before", "ga x2", "ga x1"]
    assert one["summary"][2]["requests"] == 1 and one["summary"][1]["requests"] == 2
    recs = one["methods"]["ga"]
    assert {r["request"] for r in recs} == {1}
    # the one-shot request trains on all forget facts with the whole step budget
    assert max(r["request_step"] for r in recs) <= cfg.steps * cfg.requests
    assert set(one["verdicts"]) == {"ga x2", "ga x1"}
    assert (tmp_path / "pretrained_one_shot_table.txt").read_text().count("ga x") == 2


def test_subject_focus_in_the_finetuned_phase(trained_tiny):
    from unlearnopt.eval.pulse import run_pulse

    model, tok = trained_tiny
    cfg = tiny_pulse_config(
        methods=("ga",),
        phases=("finetuned",),
        focus="subject",
        lr=5e-2,
        steps=2,
        finetune_entities=5,
    )
    report = run_pulse(
        model,
        tok,
        cfg,
        None,
        real_facts=tiny_facts(),
        fictitious=tiny_fictitious(),
        neutral=NEUTRAL,
        log=lambda s: None,
    )
    split = report["phases"]["finetuned"]["split"]
    people = [{i.split("/")[1] for i in r} for r in split["forget_requests"]]
    assert [len(p) for p in people] == [1, 1] and people[0] != people[1]
    # neighbours: other invented people's facts (held out), not the real facts
    assert split["neighbour"] and all(i.startswith("fict/") for i in split["neighbour"])
    assert not {i.split("/")[1] for i in split["neighbour"]} & (people[0] | people[1])
