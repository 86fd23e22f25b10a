"""TOFU/MUSE metrics: hand-computed cases for each formula, and the model-level helpers
against the existing answer scorer on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.pulse_fixtures import all_texts, tiny_facts, tiny_llama, tiny_tokenizer
from unlearnopt.eval.metrics import score_answers
from unlearnopt.eval.tofu_metrics import (
    answer_token_hits,
    exact_memorization,
    extraction_strength,
    forget_quality,
    harmonic_mean,
    membership_privacy_leakage,
    model_utility,
    privacy_leakage,
    rouge_l_recall,
    truth_ratio,
    truth_ratios,
    wrong_answers,
)


def test_truth_ratio_by_hand():
    # P̄(correct) = 0.5, P̄(wrong) = 0.1 and 0.3: R = 0.2 / 0.5 = 0.4
    assert truth_ratio(math.log(0.5), [math.log(0.1), math.log(0.3)]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="wrong"):
        truth_ratio(0.0, [])


def test_forget_quality_by_hand():
    # Identical samples: KS statistic 0, p-value 1. Disjoint samples of 4 vs 4: D = 1,
    # exact two-sided p = 2 / C(8, 4) = 2 / 70.
    assert forget_quality([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)
    assert forget_quality([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(2 / 70)
    with pytest.raises(ValueError, match="needs truth ratios from both models"):
        forget_quality([], [1.0])


def test_harmonic_mean_and_model_utility_by_hand():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)  # 2 / (1 + 2)
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    # six scores: 2 x (0.5, 0.25, 1.0): 6 / (2 * (2 + 4 + 1)) = 3/7
    assert model_utility([0.5, 0.5], [0.25, 0.25], [1.0, 1.0]) == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="non-negative values"):
        harmonic_mean([0.5, -0.1])


def test_privacy_leakage_by_hand():
    assert privacy_leakage(0.75, 0.5) == pytest.approx(0.5)
    assert privacy_leakage(0.5, 0.5) == 0.0
    assert privacy_leakage(0.4, 0.5) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="auc_retain"):
        privacy_leakage(0.5, 0.0)
    # unlearned: members all below non-members (AUC 1); retain model: AUC 0.5 -> +1.0
    assert membership_privacy_leakage(
        [0.1, 0.2], [0.5, 0.6], [0.3, 0.5], [0.3, 0.5]
    ) == pytest.approx(1.0)


def test_rouge_l_recall_by_hand():
    assert rouge_l_recall("the capital is Paris", "Paris") == 1.0
    # LCS of "a b c d" in "a x c y d" is "a c d": 3 of 4 reference words
    assert rouge_l_recall("a x c y d", "a b c d") == pytest.approx(0.75)
    assert rouge_l_recall("nothing here", "Paris") == 0.0
    assert rouge_l_recall("x", "") == 0.0


def test_exact_memorization_and_extraction_strength_by_hand():
    hits = [False, True, False, True, True]
    assert exact_memorization(hits) == pytest.approx(3 / 5)
    # the last two tokens follow greedily once the first three are given: ES = 1 - 3/5
    assert extraction_strength(hits) == pytest.approx(2 / 5)
    assert extraction_strength([True, True]) == 1.0
    assert extraction_strength([True, False]) == 0.0
    with pytest.raises(ValueError, match="at least one answer token"):
        exact_memorization([])


def test_wrong_answers_use_the_same_relation():
    facts = tiny_facts()
    f = facts[0]
    wrong = wrong_answers(f, facts, k=3)
    same = {g.answer for g in facts if g.relation == f.relation} - {f.answer}
    assert wrong and set(wrong) <= same and len(wrong) == min(3, len(same))
    assert wrong == wrong_answers(f, facts, k=3)


def test_model_helpers_agree_with_the_answer_scorer():
    tok = tiny_tokenizer(all_texts())
    model = tiny_llama(len(tok))
    facts = tiny_facts()[:4]
    scores = score_answers(model, tok, [f.prompt for f in facts], [f.answer for f in facts])
    hits = answer_token_hits(model, tok, facts)
    assert [bool(h.all()) for h in hits] == list(scores.exact)
    ratios = truth_ratios(model, tok, facts, tiny_facts(), k=2)
    for f, r, p in zip(facts, ratios, scores.prob):
        wrong = wrong_answers(f, tiny_facts(), k=2)
        pw = score_answers(model, tok, [f.prompt] * len(wrong), wrong).prob
        assert r == pytest.approx(np.mean(pw) / p, rel=1e-6)


def test_pulse_finetuned_phase_reports_tofu_metrics_against_a_retain_model(monkeypatch, tmp_path):
    from tests.pulse_fixtures import NEUTRAL, tiny_fictitious, tiny_pulse_config
    from unlearnopt.eval.pulse import run_pulse
    from unlearnopt.eval.tofu_metrics import TOFU_METRIC_NAMES

    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")
    tok = tiny_tokenizer(all_texts())
    model = tiny_llama(len(tok))
    lines = []
    report = run_pulse(
        model,
        tok,
        tiny_pulse_config(methods=("ga", "simnpo"), phases=("finetuned",), requests=1, steps=2),
        tmp_path,
        real_facts=tiny_facts(),
        fictitious=tiny_fictitious(),
        neutral=NEUTRAL,
        log=lines.append,
    )
    data = report["phases"]["finetuned"]
    assert set(data["tofu_before"]) == set(TOFU_METRIC_NAMES)
    assert any("retain model" in line for line in lines)
    for method in ("ga", "simnpo"):
        tofu = data["methods"][method][-1]["tofu"]
        assert set(tofu) == set(TOFU_METRIC_NAMES)
        assert 0.0 <= tofu["forget_quality"] <= 1.0
        assert 0.0 <= tofu["exact_memorization"] <= 1.0
    table = (tmp_path / "finetuned_tofu_table.txt").read_text()
    assert "forget quality" in table and "simnpo@end" in table and "before" in table
    off = run_pulse(
        model,
        tok,
        tiny_pulse_config(
            methods=("ga",), phases=("finetuned",), requests=1, steps=1, retain_model=False
        ),
        None,
        real_facts=tiny_facts(),
        fictitious=tiny_fictitious(),
        neutral=NEUTRAL,
        log=lambda s: None,
    )
    assert "tofu_before" not in off["phases"]["finetuned"]
