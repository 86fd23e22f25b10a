"""Fixtures of the PULSE tests: one thread, the reference backend, and a tiny Llama that has
learned the tiny facts (trained once per module)."""

from __future__ import annotations

import pytest
import torch

from tests.pulse_fixtures import all_texts, tiny_facts, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matrices: OpenMP threads only add synchronisation (10x slower on a busy machine)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained_tiny(_one_thread):
    """A tiny Llama that has learned ``tiny_facts()`` (its "pre-trained" knowledge)."""
    from unlearnopt.eval.pulse import finetune

    tok = tiny_tokenizer(all_texts())
    model = tiny_llama(len(tok))
    info = finetune(
        model, tok, tiny_facts(), lr=3e-2, epochs=60, batch_size=16, target_acc=1.0, progress=False
    )
    assert info["finetune_acc"] >= 0.9, info
    return model, tok


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # keep these protocol tests independent of the C++ build; kernels have their own tests
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")
