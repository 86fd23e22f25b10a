"""RMU: the decoder-layer hook on every tiny architecture, and ``step()`` against a
hand-written step (plain PyTorch hooks, float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.methods.step_fixtures import LR, TOL, assert_update, setup
from tests.tiny_models import KINDS, make_batch, make_model
from unlearnopt.methods import make_method
from unlearnopt.unlearner import MultiObjectiveUnlearner
from unlearnopt.unlearner.layers import decoder_layers, layer_output


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("kind", KINDS)
def test_layer_output_is_the_layers_hidden_state(kind):
    model, batch = make_model(kind), make_batch(kind)
    h = layer_output(lambda: model(**_inputs(batch)), model, 0)
    expected = model(**_inputs(batch), output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(h, expected)


def test_layer_output_trains_only_the_chosen_layers():
    model, batch = make_model("llama"), make_batch("llama")
    layers = decoder_layers(model)
    layer_output(lambda: model(**_inputs(batch)), model, 1, train_from=1).sum().backward()
    assert all(p.grad is None for p in layers[0].parameters())
    assert all(p.grad is not None for p in layers[1].parameters())
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None
    with pytest.raises(ValueError, match="layer must be"):
        layer_output(lambda: model(**_inputs(batch)), model, 2)
    with pytest.raises(ValueError, match="train_from"):
        layer_output(lambda: model(**_inputs(batch)), model, 0, train_from=1)


def test_decoder_layers_needs_repeated_blocks():
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def _hand_hidden(model, batch, layer, train_from):
    """Layer ``layer``'s output via plain hooks; layer ``train_from``'s input detached."""
    layers = model.model.layers
    out = {}
    hooks = [
        layers[layer].register_forward_hook(
            lambda m, a, o: out.setdefault("h", o[0] if isinstance(o, tuple) else o)
        )
    ]
    if train_from is not None:
        hooks.append(
            layers[train_from].register_forward_pre_hook(lambda m, a: (a[0].detach(), *a[1:]))
        )
    model(**_inputs(batch), use_cache=False)
    for h in hooks:
        h.remove()
    return out["h"]


@pytest.mark.parametrize(
    "opts",
    [
        {"layer": 1, "depth": 1, "steering_coeff": 3.0, "alpha": 2.0},
        {"layer": 1, "depth": 2, "steering_coeff": 1.0, "alpha": 0.0, "seed": 3},
    ],
)
def test_rmu_step_matches_handwritten(opts):
    model, ref, forget, retain = setup("llama")
    hand = copy.deepcopy(model)
    cfg = make_method("rmu", **opts).config
    layer, train_from = cfg["layer"], cfg["layer"] - cfg["depth"] + 1
    gen = torch.Generator().manual_seed(cfg["seed"])
    u = torch.rand(32, generator=gen, dtype=torch.float64)
    u = u / u.norm()

    def mse(h, target, mask):
        per_token = ((h - target) ** 2).mean(-1)
        return per_token[mask.bool()].mean()

    hf = _hand_hidden(hand, forget, layer, train_from)
    total = mse(hf, cfg["steering_coeff"] * u, forget["attention_mask"])
    if cfg["alpha"] > 0:
        hr = _hand_hidden(hand, retain, layer, train_from)
        with torch.no_grad():
            hr_ref = _hand_hidden(ref, retain, layer, None)
        total = total + cfg["alpha"] * mse(hr, hr_ref, retain["attention_mask"])
    params_h = list(hand.parameters())
    d = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(params_h, torch.autograd.grad(total, params_h, allow_unused=True))
    ]

    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    unlearner = MultiObjectiveUnlearner(
        model, torch.optim.SGD(params, lr=LR), "rmu", ref_model=ref, **opts
    )
    stats = unlearner.step(forget=forget, retain=retain)
    for p, b, dq in zip(params, before, d):
        assert_update(p.detach(), b, dq, TOL)
    changed = {n for (n, p), b in zip(model.named_parameters(), before) if not torch.equal(p, b)}
    assert changed and all(
        any(f"layers.{i}." in n for i in range(train_from, layer + 1)) for n in changed
    )
    assert stats["loss/forget_rmu"] > 0
    assert ("loss/retain_rmu" in stats) == (cfg["alpha"] > 0)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "llava", "lora"])
def test_rmu_runs_on_other_architectures(kind):
    model, ref, forget, retain = setup(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    unlearner = MultiObjectiveUnlearner(
        model, torch.optim.SGD(params, lr=0.1), "rmu", ref_model=ref, layer=1, depth=1, alpha=1.0
    )
    stats = unlearner.step(forget=forget, retain=retain)
    assert stats["loss/forget_rmu"] > 0 and stats["grad_norm/forget_rmu"] > 0


def test_rmu_config_is_checked():
    cases = [
        ({"layer": -1}, "layer must be an int >= 0"),
        ({"depth": 0}, "depth must be an int >= 1"),
        ({"layer": 1, "depth": 3}, "reaches below layer 0"),
        ({"alpha": -1.0}, "alpha must be a non-negative number"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            make_method("rmu", **bad)


def test_context_without_layer_forward_says_so():
    from unlearnopt.contract import ObjectiveContext

    ctx = ObjectiveContext(
        {"labels": torch.zeros(1, 2, dtype=torch.long)}, "forget", lambda b, k: None
    )
    with pytest.raises(ValueError, match="hidden states"):
        ctx.hidden_at(0)
