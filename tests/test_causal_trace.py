"""Causal tracing (unlearnopt.causal_trace) on a tiny Llama: each layer's indirect effect
against the same three runs written out by hand."""

from __future__ import annotations

import pytest
import torch

from unlearnopt.causal_trace import mlp_down_projections, subject_span, trace_layers
from unlearnopt.data import Fact


class WordTokenizer:
    """Whitespace words -> ids (a BOS of id 1 first when special tokens are on)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, **_):
        ids = [3 + sum(map(ord, w)) % 90 for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


FACTS = [
    Fact(prompt="the capital of new alpha is", answer="gamma", subject="new alpha"),
    Fact(prompt="beta has the capital", answer="delta", subject="beta"),
]


@pytest.fixture(scope="module")
def model():
    from tests.tiny_models import make_model

    torch.manual_seed(0)
    return make_model("llama").eval()


def test_subject_span():
    tok = WordTokenizer()
    assert subject_span(tok, FACTS[0].prompt, "new alpha") == (4, 5)  # BOS the capital of
    assert subject_span(tok, FACTS[1].prompt, "beta") == (1, 1)  # right after BOS


@torch.no_grad()
def _by_hand(model, tok, layer, noise, samples, seed):
    """The restored run for ``layer`` (and the clean/corrupted ones), hooks written here."""
    from unlearnopt.answers import encode_facts

    batch = encode_facts(tok, FACTS)
    spans = [subject_span(tok, f.prompt, f.subject) for f in FACTS]
    emb = model.get_input_embeddings()

    def prob(b, hooks=()):
        handles = [m.register_forward_hook(h) for m, h in hooks]
        try:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        finally:
            for h in handles:
                h.remove()
        target = b["labels"][:, 1:]
        ok = target != -100
        p = logits[:, :-1].float().softmax(-1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
        return (p * ok).sum(1) / ok.sum(1)

    clean_out = {}

    def record(m, i, out):
        clean_out["v"] = torch.stack([out[r, s[1]] for r, s in enumerate(spans)])

    clean = prob(batch, [(layer, record)])
    many = {k: v.repeat_interleave(samples, 0) for k, v in batch.items()}
    gen = torch.Generator().manual_seed(seed)
    scale = noise * float(emb.weight.std())
    draws = torch.randn(*many["input_ids"].shape, emb.weight.shape[1], generator=gen) * scale
    rows = [s for s in spans for _ in range(samples)]

    def corrupt(m, i, out):
        out = out.clone()
        for r, (a, b) in enumerate(rows):
            out[r, a : b + 1] += draws[r, a : b + 1]
        return out

    def restore(m, i, out):
        out = out.clone()
        for r, (_, b) in enumerate(rows):
            out[r, b] = clean_out["v"][r // samples]
        return out

    corrupted = prob(many, [(emb, corrupt)])
    restored = prob(many, [(emb, corrupt), (layer, restore)])
    return clean.mean(), corrupted.mean(), (restored - corrupted).mean()


def test_effects_equal_the_runs_written_by_hand(model):
    tok = WordTokenizer()
    layers = mlp_down_projections(model)
    assert len(layers) == len(model.model.layers)
    trace = trace_layers(model, tok, FACTS, noise=3.0, samples=3, seed=4)
    assert trace.effects.shape == (len(layers),) and trace.effects.dtype == torch.float64
    for i, layer in enumerate(layers):
        clean, corrupted, effect = _by_hand(model, tok, layer, 3.0, 3, 4)
        torch.testing.assert_close(trace.effects[i], effect.double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            torch.tensor(trace.clean).double(), clean.double(), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(
            torch.tensor(trace.corrupted).double(), corrupted.double(), rtol=1e-5, atol=0
        )
    assert trace.best == int(trace.effects.argmax())
    assert trace.clean != trace.corrupted  # the noise changed the answer's probability


def test_no_noise_means_no_effect(model):
    trace = trace_layers(model, WordTokenizer(), FACTS, noise=0.0, samples=2)
    torch.testing.assert_close(trace.effects, torch.zeros_like(trace.effects), atol=1e-6, rtol=0)
    assert abs(trace.clean - trace.corrupted) < 1e-6


def test_bad_arguments(model):
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="facts must hold at least one fact"):
        trace_layers(model, tok, [])
    with pytest.raises(ValueError, match="samples must be a positive int"):
        trace_layers(model, tok, FACTS, samples=0)
    with pytest.raises(ValueError, match="noise must be a number >= 0"):
        trace_layers(model, tok, FACTS, noise=-1.0)
    with pytest.raises(ValueError, match="does not occur"):
        trace_layers(model, tok, [Fact(prompt="a b", answer="c", subject="z")])
    with pytest.raises(ValueError, match=r"no '\*\.mlp\.down_proj'"):
        mlp_down_projections(torch.nn.Linear(2, 2))
