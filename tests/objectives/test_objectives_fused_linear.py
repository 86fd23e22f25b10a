"""The objectives from the head's inputs equal their logits versions, value and gradient, on
every tiny architecture (float64 tightly, float32 to rounding)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import KINDS, VOCAB, make_batch, make_model, perturb_lora
from unlearnopt.objectives import (
    ce_u_loss,
    ce_u_loss_from_hidden,
    kl_to_reference,
    kl_to_reference_from_hidden,
    masked_kl_from_hidden,
    npo_loss,
    npo_loss_from_hidden,
    satimp_loss,
    satimp_loss_from_hidden,
    sequence_log_prob,
    sequence_log_prob_from_hidden,
    simnpo_loss,
    simnpo_loss_from_hidden,
    token_loss,
    token_loss_from_hidden,
    wga_loss,
    wga_loss_from_hidden,
)
from unlearnopt.ops.masked_kl import masked_kl, vocab_mask_from_token_ids
from unlearnopt.output_head import HeadInputs, forward_head_inputs

TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 2e-6}}


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _token_mask(labels):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(labels.shape, generator=g) < 0.7
    mask[:, -1] = False
    return mask


def _vocab_mask():
    return vocab_mask_from_token_ids([1, 5, 17, VOCAB - 2], VOCAB)


def _logits_loss(name, logits, ref_logits, labels):
    if name in ("nll", "ga", "uce"):
        return token_loss(logits, labels, name, alpha=0.4)
    if name == "wga":
        return wga_loss(logits, labels, beta=1.5)
    if name == "satimp":
        return satimp_loss(logits, labels, beta1=0.5, beta2=2.0)
    if name == "ce_u":
        return ce_u_loss(logits, labels)
    if name == "seq_log_prob":
        return (sequence_log_prob(logits, labels) * torch.arange(1, labels.shape[0] + 1)).sum()
    if name == "npo":
        return npo_loss(logits, ref_logits, labels, beta=0.3)
    if name == "simnpo":
        return simnpo_loss(logits, labels, beta=0.7, gamma=0.3)
    if name == "kl":
        return kl_to_reference(logits, ref_logits, labels)
    direction = name.split("_")[1]
    v = logits.shape[-1]
    return masked_kl(
        logits.reshape(-1, v),
        ref_logits.reshape(-1, v),
        token_mask=_token_mask(labels).reshape(-1),
        vocab_mask=_vocab_mask(),
        direction=direction,
        temperature=2.0,
    )


def _hidden_loss(name, head, ref_head, labels):
    if name in ("nll", "ga", "uce"):
        return token_loss_from_hidden(head, labels, name, alpha=0.4)
    if name == "wga":
        return wga_loss_from_hidden(head, labels, beta=1.5)
    if name == "satimp":
        return satimp_loss_from_hidden(head, labels, beta1=0.5, beta2=2.0)
    if name == "ce_u":
        return ce_u_loss_from_hidden(head, labels)
    if name == "seq_log_prob":
        weights = torch.arange(1, labels.shape[0] + 1)
        return (sequence_log_prob_from_hidden(head, labels) * weights).sum()
    if name == "npo":
        with torch.no_grad():
            ref_lp = sequence_log_prob_from_hidden(ref_head, labels)
        return npo_loss_from_hidden(head, ref_lp, labels, beta=0.3)
    if name == "simnpo":
        return simnpo_loss_from_hidden(head, labels, beta=0.7, gamma=0.3)
    if name == "kl":
        return kl_to_reference_from_hidden(head, ref_head, labels)
    direction = name.split("_")[1]
    return masked_kl_from_hidden(
        head, ref_head, _token_mask(labels), _vocab_mask(), direction=direction, temperature=2.0
    )


OBJECTIVES = (
    "nll",
    "ga",
    "uce",
    "wga",
    "satimp",
    "ce_u",
    "seq_log_prob",
    "npo",
    "simnpo",
    "kl",
    "dmk_forward",
    "dmk_reverse",
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("kind", (*KINDS, "lora_head"))
def test_from_hidden_equals_logits_path(kind, name, dtype):
    model = perturb_lora(make_model(kind, dtype=dtype))
    ref = make_model(kind, dtype=dtype, seed=1)  # a different "original" model
    ref.eval()
    batch = make_batch("llama" if kind == "lora_head" else kind, batch=3, seq=10, dtype=dtype)
    labels, inputs = batch["labels"], _inputs(batch)
    params = [p for p in model.parameters() if p.requires_grad]

    with torch.no_grad():
        ref_logits = ref(**inputs).logits
    expected = _logits_loss(name, model(**inputs).logits, ref_logits, labels)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)

    with torch.no_grad():
        ref_head = forward_head_inputs(ref, inputs)
    head = forward_head_inputs(model, inputs)
    got = _hidden_loss(name, head, ref_head, labels)
    got_grads = torch.autograd.grad(got, params, allow_unused=True)

    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **TOL[dtype])
    assert float(expected.detach().abs()) > 0
    reached = 0
    for g, e in zip(got_grads, expected_grads):
        if e is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        reached += 1
        torch.testing.assert_close(g, e, **TOL[dtype])
    assert reached > 0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tied_and_untied_heads_get_their_gradient(kind):
    """GPT-2's head is its input embedding: the fused path's weight gradient must reach it."""
    model = make_model(kind, dtype=torch.float64)
    batch = make_batch(kind, dtype=torch.float64)
    head = forward_head_inputs(model, _inputs(batch))
    weight = model.get_output_embeddings().weight
    assert head.weight is weight
    assert (kind == "gpt2") == (weight is model.get_input_embeddings().weight)
    token_loss_from_hidden(head, batch["labels"], "ga").backward()
    logits_grad = weight.grad.clone()
    weight.grad = None
    token_loss(model(**_inputs(batch)).logits, batch["labels"], "ga").backward()
    torch.testing.assert_close(logits_grad, weight.grad, rtol=1e-10, atol=1e-13)


def test_autocast_casts_the_head_like_the_model():
    model = make_model("llama")
    batch = make_batch("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**_inputs(batch)).logits
        head = forward_head_inputs(model, _inputs(batch))
        got = token_loss_from_hidden(head, batch["labels"], "nll")
        expected = token_loss(logits, batch["labels"], "nll")
    assert logits.dtype == torch.bfloat16
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_bad_arguments_name_what_was_expected():
    model = make_model("llama")
    batch = make_batch("llama")
    head = forward_head_inputs(model, _inputs(batch))
    with pytest.raises(TypeError, match="HeadInputs"):
        token_loss_from_hidden(model(**_inputs(batch)).logits, batch["labels"])
    with pytest.raises(ValueError, match=r"head.hidden has shape"):
        token_loss_from_hidden(head, batch["labels"][:, :4])
    with pytest.raises(ValueError, match="token_mask"):
        masked_kl_from_hidden(head, head, batch["labels"][0])
    with pytest.raises(ValueError, match="beta"):
        npo_loss_from_hidden(head, torch.zeros(2), batch["labels"], beta=0.0)
    assert isinstance(head, HeadInputs)


class _Ctx:
    """An objective context with or without the head's inputs."""

    def __init__(self, model, ref, batch, fused):
        self.labels = batch["labels"]
        self._inputs = _inputs(batch)
        self.model, self.ref, self.fused = model, ref, fused
        self.head = forward_head_inputs(model, self._inputs) if fused else None
        with torch.no_grad():
            self.ref_head = forward_head_inputs(ref, self._inputs) if fused else None

    @property
    def logits(self):
        assert not self.fused, "the fused path must not compute the logits"
        return self.model(**self._inputs).logits

    @property
    def ref_logits(self):
        assert not self.fused, "the fused path must not compute the reference's logits"
        with torch.no_grad():
            return self.ref(**self._inputs).logits


@pytest.mark.parametrize("name", ["nll", "uce", "npo", "kl", "dmk"])
def test_context_losses_take_the_head_when_offered(name):
    from unlearnopt.objectives import (
        kl_to_reference_of,
        masked_kl_of,
        npo_loss_of,
        token_loss_of,
        vocab_size_of,
    )

    model = make_model("qwen2", dtype=torch.float64)
    ref = make_model("qwen2", dtype=torch.float64, seed=1).eval()
    batch = make_batch("qwen2", batch=3, dtype=torch.float64)
    params = list(model.parameters())
    results = []
    for fused in (True, False):
        ctx = _Ctx(model, ref, batch, fused)
        assert vocab_size_of(ctx) == VOCAB
        loss = {
            "nll": lambda c: token_loss_of(c, "nll"),
            "uce": lambda c: token_loss_of(c, "uce", alpha=0.3),
            "npo": lambda c: npo_loss_of(c, beta=0.2),
            "kl": kl_to_reference_of,
            "dmk": lambda c: masked_kl_of(c, _token_mask(c.labels), _vocab_mask(), "reverse", 1.5),
        }[name](ctx)
        results.append((loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (fused_loss, fused_grads), (logits_loss, logits_grads) = results
    torch.testing.assert_close(fused_loss, logits_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(fused_grads, logits_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
