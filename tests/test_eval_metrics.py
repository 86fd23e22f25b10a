"""Unlearning metrics: label layout, exact match = greedy decoding, perplexity, AUC, diversity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_eval_pulse import all_texts, tiny_facts, tiny_llama, tiny_tokenizer
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
    assert b["labels"][0, n_prompt:n_prompt + len(ans)].tolist() == ans
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
    m = evaluate(model, tok, forget=facts[:2], retain=facts[2:4], neighbour=facts[4:6],
                 neutral=["the train is late again today"], nonmember=facts[10:12],
                 diversity_prompts=["the dog"], max_new_tokens=3, progress=False)
    assert set(m) == {"forget_acc", "forget_prob", "general_acc", "general_prob", "retain_acc",
                      "retain_prob", "neighbour_acc", "neighbour_prob", "ppl", "diversity",
                      "mia_auc"}
    assert all(0 <= m[k] <= 1 for k in m if k != "ppl") and m["ppl"] > 1
