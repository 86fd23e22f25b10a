"""The training driver shared by ``unlearnopt run`` and PULSE: batches come from the method's
``fact_batches`` hook, and the tuned settings resolve in one place."""

from __future__ import annotations

import pytest
import torch

from tests.pulse_fixtures import all_texts, tiny_facts, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")


def test_unlearning_run_builds_batches_with_the_method_hook():
    from unlearnopt.methods import get_method, register_method
    from unlearnopt.training import UnlearningRun

    calls = []
    ga = get_method("ga")

    class OnlyFirstFact(ga):
        """GA that trains on the first forget fact only (a visible, hook-made batch)."""

        name = "ga_first_fact"

        def fact_batches(self, forget, retain, *, encode, tokenizer, vocab_size):
            calls.append(([f.id for f in forget], [f.id for f in retain], vocab_size))
            return encode([forget[0].prompt], [forget[0].answer]), None

    register_method("ga_first_fact", OnlyFirstFact, overwrite=True)
    tok = tiny_tokenizer(all_texts())
    model = tiny_llama(len(tok))
    facts = tiny_facts()
    run = UnlearningRun(
        model, tok, "ga_first_fact", None, facts[4:8], lr=1e-3, retain_batch_size=2, seed=0
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run.step(facts[:3])
    assert len(calls) == 1
    forget_ids, retain_ids, vocab = calls[0]
    assert forget_ids == [f.id for f in facts[:3]] and len(retain_ids) == 2
    assert set(retain_ids) <= {f.id for f in facts[4:8]} and vocab == len(tok)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_default_hook_encodes_retain_only_when_the_method_needs_it():
    from unlearnopt.eval.metrics import encode_qa
    from unlearnopt.methods import get_method

    tok = tiny_tokenizer(all_texts())
    facts = tiny_facts()
    kw = {"encode": lambda p, a: encode_qa(tok, p, a), "tokenizer": tok, "vocab_size": len(tok)}
    fb, rb = get_method("ga")().fact_batches(facts[:2], facts[2:4], **kw)
    assert fb["labels"].shape[0] == 2 and rb is None
    fb, rb = get_method("grad_diff")().fact_batches(facts[:2], facts[2:5], **kw)
    assert rb["labels"].shape[0] == 3
    assert torch.equal(
        fb["input_ids"],
        encode_qa(tok, [f.prompt for f in facts[:2]], [f.answer for f in facts[:2]])["input_ids"],
    )


def test_tuned_settings_order():
    from unlearnopt.training import TUNED_METHOD_OPTIONS, tuned_settings

    assert tuned_settings("ga", 2e-5) == {"lr": 2e-5}
    assert tuned_settings("siu", 2e-5) == {"lr": TUNED_METHOD_OPTIONS["siu"]["lr"]}
    assert tuned_settings("siu", 2e-5, {"lr": 1e-6, "beta": 1.0}) == {"lr": 1e-6, "beta": 1.0}
