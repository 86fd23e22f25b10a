"""Unlearning metrics: label layout, exact match = greedy decoding, perplexity, AUC, diversity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.pulse_fixtures import all_texts, tiny_facts, tiny_llama, tiny_tokenizer
from unlearnopt.eval.metrics import (
    encode_qa,
    evaluate,
    generate_greedy,
    membership_auc,
    perplexity,
    score_answers,
    unique_token_ratio,
)


@pytest.fixture(scope="module")
def tiny():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = tiny_tokenizer(all_texts())
    yield tiny_llama(len(tok), seed=3).eval(), tok
    torch.set_num_threads(old)


def test_encode_qa_labels_only_the_answer(tiny):
    _, tok = tiny
    b = encode_qa(tok, ["the capital of Aland is", "the colour of sky is"], ["Bormo", "blue"])
    ans = tok(" Bormo", add_special_tokens=False)["input_ids"]
    n_prompt = len(tok("the capital of Aland is")["input_ids"])
    assert b["labels"][0, n_prompt : n_prompt + len(ans)].tolist() == ans
    assert (b["labels"][0, :n_prompt] == -100).all()
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    with pytest.raises(ValueError, match="same length"):
        encode_qa(tok, ["a"], [])


def test_exact_match_equals_greedy_generation(tiny):
    model, tok = tiny
    facts = tiny_facts()
    prompts = [f.prompt for f in facts]
    # answers = what the model itself generates greedily -> exact match must be 1 everywhere
    gens = generate_greedy(model, tok, prompts, max_new_tokens=1)
    answers = [tok.decode(g).strip() or "[UNK]" for g in gens]
    s = score_answers(model, tok, prompts, answers, batch_size=5)
    assert s.exact.all()
    assert np.all((s.prob > 0) & (s.prob <= 1)) and np.allclose(s.loss, -np.log(s.prob))
    # a different answer than the greedy one is not an exact match
    wrong = [("blue" if a != "blue" else "red") for a in answers]
    assert not score_answers(model, tok, prompts, wrong).exact.any()


def test_perplexity_matches_the_model_loss(tiny):
    model, tok = tiny
    text = "the dog walks to the park in the morning"
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert perplexity(model, tok, [text]) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_membership_auc_and_diversity():
    assert membership_auc([0.1, 0.2], [1.0, 2.0]) == 1.0
    assert membership_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert membership_auc([1.0], [1.0]) == 0.5
    assert math.isnan(membership_auc([], [1.0]))
    assert unique_token_ratio([[1, 2, 3, 4], [5, 5, 5, 5], []]) == pytest.approx((1 + 0.25) / 3)


def test_evaluate_returns_every_metric(tiny):
    model, tok = tiny
    facts = tiny_facts()
    m = evaluate(
        model,
        tok,
        forget=facts[:2],
        retain=facts[2:4],
        neighbour=facts[4:6],
        neutral=["the train is late again today"],
        nonmember=facts[10:12],
        diversity_prompts=["the dog"],
        max_new_tokens=3,
        progress=False,
    )
    assert set(m) == {
        "forget_acc",
        "forget_prob",
        "general_acc",
        "general_prob",
        "retain_acc",
        "retain_prob",
        "neighbour_acc",
        "neighbour_prob",
        "ppl",
        "diversity",
        "mia_auc",
    }
    assert all(0 <= m[k] <= 1 for k in m if k != "ppl") and m["ppl"] > 1


def test_verdict_in_words_names_the_thresholds():
    from unlearnopt.eval.pulse.protocol import describe_verdict, quality_verdict

    before = {"forget_acc": 1.0, "retain_acc": 0.8, "neighbour_acc": 1.0, "ppl": 40.0}
    good = {"forget_acc": 0.0, "retain_acc": 0.75, "neighbour_acc": 0.9, "ppl": 44.0}
    assert describe_verdict(before, good) == "meets the quality bar"
    assert all(quality_verdict(before, good).values())
    bad = {"forget_acc": 0.25, "retain_acc": 0.5, "neighbour_acc": 1.0, "ppl": 50.0}
    text = describe_verdict(before, bad)
    assert "forget accuracy 0.25 (needs <= 0.10)" in text
    assert "retain accuracy 0.50 (needs >= 0.72, 90% of 0.80 before)" in text
    assert "perplexity 50.0 (needs <= 44.0, before 40.0 +10%)" in text
    assert "neighbour" not in text
    assert quality_verdict(before, bad) == {
        "forgot": False,
        "kept_retain": False,
        "kept_neighbours": True,
        "fluent": False,
    }


def test_tables_and_plots_share_metric_names_with_directions():
    from unlearnopt.eval.metrics import METRIC_LABELS
    from unlearnopt.eval.report import PLOT_METRICS, TABLE_COLUMNS, format_table

    for key, label, _ in TABLE_COLUMNS[1:]:
        assert label == METRIC_LABELS[key] and label[-1] in "↑↓5"
    assert set(PLOT_METRICS) <= set(METRIC_LABELS)
    rows = [{"name": "before", "steps": 0, "forget_acc": 1.0, "mia_auc": 0.9}]
    text = format_table(rows, legend=True)
    assert "forget acc ↓" in text.splitlines()[0] and "MIA AUC: 0.5 = " in text
