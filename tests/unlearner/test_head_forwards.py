"""``HeadForwards``: head inputs for the objective contexts, one warning on fallback, and the
reference's outputs cached per distinct forget batch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tests.tiny_models import make_batch, make_model, perturb_lora
from unlearnopt.objectives import sequence_log_prob
from unlearnopt.unlearner.head_forward import HeadForwards


class PlainForwards:
    """The plain forward passes, counting the reference's forwards."""

    def __init__(self, model, ref_model=None):
        self.model, self.ref_model = model, ref_model
        self.ref_calls = 0
        target = ref_model if ref_model is not None else model
        target.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        if not torch.is_grad_enabled():
            self.ref_calls += 1

    def inputs(self, batch):
        return {k: v for k, v in batch.items() if k != "labels"}

    @torch.no_grad()
    def ref_forward(self, batch, kind="batch"):
        if self.ref_model is not None:
            return self.ref_model(**self.inputs(batch)).logits
        with self.model.disable_adapter():
            return self.model(**self.inputs(batch)).logits


def _pair(kind="llama", dtype=torch.float64):
    model = make_model(kind, dtype=dtype)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, ref


def test_head_inputs_and_reference_cache_per_forget_batch():
    model, ref = _pair()
    fw = PlainForwards(model, ref)
    heads = HeadForwards(fw, needs_ref=True)
    forget, retain = make_batch("llama", seed=0), make_batch("llama", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = heads.head(forget, "forget")
    torch.testing.assert_close(head.logits(), model(**fw.inputs(forget)).logits, rtol=0, atol=0)
    assert fw.ref_calls == 1  # the first call checked the reference
    for _ in range(3):
        rh = heads.ref_head(forget, "forget")
        heads.end_step()
    assert fw.ref_calls == 1 and not rh.hidden.requires_grad
    torch.testing.assert_close(rh.logits(), ref(**fw.inputs(forget)).logits, rtol=0, atol=0)
    heads.ref_head(retain, "retain")
    heads.ref_head(retain, "retain")
    assert fw.ref_calls == 3  # retain batches are not kept
    lp = heads.ref_sequence_log_prob(forget, "forget")
    lp2 = heads.ref_sequence_log_prob({k: v.clone() for k, v in forget.items()}, "forget")
    assert lp2 is lp and fw.ref_calls == 4
    torch.testing.assert_close(
        lp, sequence_log_prob(fw.ref_forward(forget), forget["labels"]), rtol=1e-12, atol=1e-12
    )


def test_cache_off_runs_the_reference_every_time():
    from unlearnopt.unlearner.reference_cache import ReferenceCache

    model, ref = _pair()
    fw = PlainForwards(model, ref)
    heads = HeadForwards(fw, needs_ref=True, cache=ReferenceCache(enabled=False))
    forget = make_batch("llama")
    for _ in range(3):
        heads.ref_sequence_log_prob(forget, "forget")
    assert fw.ref_calls == 3


@pytest.mark.parametrize("kind,reason", [("lora_dropout", "dropout"), ("gemma2", "soft-capping")])
def test_unsupported_head_warns_once_and_gives_none(kind, reason):
    """Dropout on a LoRA head is refused at construction, soft-capping at the first forward."""
    if kind == "gemma2":
        model = make_model(kind)
        ref = copy.deepcopy(model).eval()
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            make_model("llama"),
            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "lm_head"]),
        )
        ref = None
    batch = make_batch("llama")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        heads = HeadForwards(PlainForwards(model, ref), needs_ref=True)
        for _ in range(3):
            assert heads.head(batch, "forget") is None
            assert heads.ref_head(batch, "forget") is None
    ours = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 1 and reason.split()[-1] in str(ours[0].message)
    assert not heads.active and reason.split()[0] in heads.reason
    # The logits path still serves the reference's log-probabilities.
    assert heads.ref_sequence_log_prob(batch, "forget").shape == (2,)


def test_disabled_path_is_silent():
    model, ref = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        heads = HeadForwards(PlainForwards(model, ref), enabled=False, needs_ref=True)
        assert heads.head(make_batch("llama"), "forget") is None
    assert heads.reason == "fused_linear=False"
    with pytest.raises(TypeError, match="fused_linear"):
        HeadForwards(PlainForwards(model, ref), enabled=1)


@pytest.mark.parametrize("kind", ["lora", "lora_head"])
def test_peft_reference_is_the_model_without_adapters_and_ignores_adapter_updates(kind):
    model = perturb_lora(make_model(kind, dtype=torch.float64))  # the reference differs
    fw = PlainForwards(model)
    heads = HeadForwards(fw, needs_ref=True)
    batch = make_batch("lora")
    head = heads.head(batch, "forget")
    rh = heads.ref_head(batch, "forget")
    torch.testing.assert_close(rh.logits(), fw.ref_forward(batch), rtol=0, atol=0)
    torch.testing.assert_close(
        head.logits(), model(**fw.inputs(batch)).logits, rtol=1e-14, atol=1e-14
    )
    assert not torch.allclose(head.logits(), rh.logits())
    calls = fw.ref_calls
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1.0)
    heads.ref_head(batch, "forget")
    assert fw.ref_calls == calls  # adapters are not part of the reference
    with torch.no_grad():
        head = model.get_output_embeddings()
        getattr(head, "get_base_layer", lambda: head)().weight.mul_(1.5)
    again = heads.ref_head(batch, "forget")
    assert fw.ref_calls == calls + 1  # a base weight is
    torch.testing.assert_close(again.logits(), fw.ref_forward(batch), rtol=0, atol=0)
