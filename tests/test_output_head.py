"""``forward_head_inputs``: the head's inputs reproduce the model's logits exactly on every
tiny architecture; heads that cannot be fused are refused with the reason."""

from __future__ import annotations

import socket

import pytest
import torch

from tests.tiny_models import KINDS, make_batch, make_model, perturb_lora
from unlearnopt.output_head import (
    HeadInputs,
    HeadUnsupported,
    forward_head_inputs,
    output_head,
    unsupported_reason,
)


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", (*KINDS, "gemma2_nocap", "cohere", "granite", "lora_head"))
def test_head_inputs_reproduce_the_logits(kind, dtype):
    model = make_model(kind, dtype=dtype)
    perturb_lora(model)
    batch = make_batch("llama" if kind not in KINDS else kind, dtype=dtype)
    expected = model(**_inputs(batch)).logits
    head = forward_head_inputs(model, _inputs(batch))
    assert isinstance(head, HeadInputs)
    assert head.hidden.shape == (*batch["labels"].shape, 32)
    assert head.hidden.requires_grad
    assert head.scale == {"cohere": 0.125, "granite": 0.25}.get(kind, 1.0)
    assert "forward" not in vars(output_head(model))  # the head is restored
    if kind == "lora_head":  # W + s B A: rounding differs
        assert head.weight.requires_grad and head.weight.grad_fn is not None
        tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(head.logits(), expected, rtol=tol, atol=tol)
        with model.disable_adapter():  # the reference: the base layer
            base = forward_head_inputs(model, _inputs(batch))
            assert base.weight is output_head(model).get_base_layer().weight
            torch.testing.assert_close(
                base.logits(), model(**_inputs(batch)).logits, rtol=0, atol=0
            )
        return
    assert head.weight is output_head(model).weight
    torch.testing.assert_close(head.logits(), expected, rtol=0, atol=0)


def test_head_inputs_with_a_bias_and_a_scale():
    """A scale folds into hidden and bias: s (h W^T + b) = (s h) W^T + s b."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Embedding(20, 6)
            self.head = torch.nn.Linear(6, 20, bias=True)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids):
            return {"logits": self.head(torch.tanh(self.body(input_ids))) * 0.5}

    torch.manual_seed(0)
    model = Scaled().double()
    ids = torch.randint(0, 20, (2, 5))
    head = forward_head_inputs(model, {"input_ids": ids})
    assert head.scale == 0.5 and head.bias is not None
    torch.testing.assert_close(head.logits(), model(ids)["logits"], rtol=1e-15, atol=1e-15)


def _lora_head(**options):
    from peft import LoraConfig, get_peft_model

    model = make_model("llama")
    config = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["lm_head"],
        **options,
    }
    return get_peft_model(model, LoraConfig(**config))


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("gemma2", "soft-capping .* cap = 30"),
        ("lora_dropout", r"dropout \(p = 0.1\)"),
        ("dora", "LoRA variant"),
        ("merged", "merged"),
    ],
)
def test_unsupported_heads_name_the_reason(kind, reason):
    if kind == "gemma2":
        model = make_model(kind)
    elif kind == "lora_dropout":
        model = _lora_head(lora_dropout=0.1)
    elif kind == "dora":
        model = _lora_head(use_dora=True)
    else:
        model = _lora_head()
        output_head(model).merge()
    batch = make_batch("llama")
    with pytest.raises(HeadUnsupported, match=reason) as info:
        forward_head_inputs(model, _inputs(batch))
    assert info.value.reason == str(info.value)
    assert "forward" not in vars(output_head(model))
    # The logits path still works afterwards (nothing was left patched).
    assert model(**_inputs(batch)).logits.shape[-1] == 128


def test_structural_reasons():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert "no output head" in unsupported_reason(plain)
    model = make_model("llama")
    head = model.get_output_embeddings()
    assert unsupported_reason(model) is None
    head.forward = lambda x: torch.nn.Linear.forward(head, x)  # e.g. accelerate's hook
    try:
        assert "already wrapped" in unsupported_reason(model)
    finally:
        del head.forward


def test_a_head_called_twice_or_logits_mixed_is_refused():
    class Twice(torch.nn.Module):
        def __init__(self, mix=False):
            super().__init__()
            self.head = torch.nn.Linear(4, 10)
            self.mix = mix

        def get_output_embeddings(self):
            return self.head

        def forward(self, x):
            if self.mix:
                return self.head(x).log_softmax(-1)
            return self.head(x) + self.head(x)

    x = torch.randn(2, 3, 4)
    with pytest.raises(HeadUnsupported, match="2 times"):
        forward_head_inputs(Twice(), {"x": x})
    with pytest.raises(HeadUnsupported, match="more than a constant scale"):
        forward_head_inputs(Twice(mix=True), {"x": x})


class _Failing(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids):
        self.inner(input_ids=input_ids)
        raise RuntimeError("boom")


def test_an_exception_in_the_forward_restores_the_head():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        forward_head_inputs(_Failing(model), {"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    assert "forward" not in vars(model.get_output_embeddings())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_model_and_fsdp2():
    """Through DDP (its forward hooks run) the head inputs are the module's. Under FSDP2 the
    weight is the one all-gathered inside the root's forward; a head in its own fully_shard
    unit (resharded after its forward) is refused with the reason."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        model = make_model("llama", dtype=torch.float64)
        batch = make_batch("llama", dtype=torch.float64)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        head = forward_head_inputs(ddp, _inputs(batch))
        torch.testing.assert_close(head.logits(), model(**_inputs(batch)).logits, rtol=0, atol=0)
        assert head.weight is model.lm_head.weight
        from torch.distributed.fsdp import fully_shard

        sharded = make_model("llama", dtype=torch.float64)
        sharded.load_state_dict(model.state_dict())
        fully_shard(sharded)
        assert unsupported_reason(sharded) is None
        head = forward_head_inputs(sharded, _inputs(batch))
        assert type(head.weight).__name__ != "DTensor"  # the unsharded parameter
        torch.testing.assert_close(head.logits(), model(**_inputs(batch)).logits)
        own_unit = make_model("llama", dtype=torch.float64)
        fully_shard(own_unit.lm_head)
        fully_shard(own_unit)
        with pytest.raises(HeadUnsupported, match="FSDP2 resharded the output head's weight"):
            forward_head_inputs(own_unit, _inputs(batch))
    finally:
        dist.destroy_process_group()
