"""Whitened subject-keyed edits (unlearnopt.editing): the closed form and the hook."""

from __future__ import annotations

import pytest
import torch

from unlearnopt.editing import keyed_update, subject_last_token, whitening


def _c_inv(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4 * d, d, generator=gen, dtype=torch.float64)
    a[:, 0] += 10.0  # a direction every key shares
    return whitening(a.T @ a / a.shape[0], ridge=1e-3), a


def test_update_realises_every_value_change():
    c_inv, _ = _c_inv(6)
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    dw = keyed_update(keys, values, c_inv)
    torch.testing.assert_close(dw @ keys.T, values.T)


def test_update_is_least_c_norm_and_leaves_c_orthogonal_keys_alone():
    c_inv, _ = _c_inv(6)
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    dw = keyed_update(keys, values, c_inv)
    # a key with k'^T C^-1 k_f = 0 for both forget keys is not moved
    other = torch.randn(6, generator=gen, dtype=torch.float64)
    basis = c_inv @ keys.T  # [6, 2]
    other = other - basis @ torch.linalg.lstsq(basis, other).solution
    torch.testing.assert_close(dw @ other, torch.zeros(3, dtype=torch.float64))
    # any other solution of dW K = R has a larger C-norm tr(dW C dW^T)
    c = torch.linalg.inv(c_inv)
    null = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    null = null - (null @ keys.T) @ torch.linalg.pinv(keys.T)  # null @ keys.T == 0
    alt = dw + null
    torch.testing.assert_close(alt @ keys.T, values.T)
    assert float(torch.trace(alt @ c @ alt.T)) > float(torch.trace(dw @ c @ dw.T))


def test_whitening_moves_a_shared_direction_less_than_a_raw_update():
    # keys = 10 e_0 (shared by all) + unit noise: C = diag(101, 1, ..., 1)
    c_inv = whitening(
        torch.diag(torch.tensor([101.0, 1, 1, 1, 1, 1], dtype=torch.float64)), ridge=0.0
    )
    key = torch.zeros(1, 6, dtype=torch.float64)
    key[0, 0], key[0, 1] = 5.0, 1.0  # mostly the shared direction
    neighbour = torch.zeros(6, dtype=torch.float64)
    neighbour[0], neighbour[2] = 5.0, 1.0  # same shared part, its own rest
    value = torch.ones(1, 2, dtype=torch.float64)
    whitened = keyed_update(key, value, c_inv)
    raw = keyed_update(key, value, torch.eye(6, dtype=torch.float64))
    assert float((whitened @ neighbour).norm()) < 0.5 * float((raw @ neighbour).norm())


def test_subject_last_token():
    class Tok:
        def __call__(self, text):
            return {"input_ids": text.split()}

    assert subject_last_token(Tok(), "The capital of New Zealand is", "New Zealand") == 4
    with pytest.raises(ValueError, match="does not occur"):
        subject_last_token(Tok(), "The capital of France is", "Peru")


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="must have the same n"):
        keyed_update(torch.zeros(2, 3), torch.zeros(3, 4), torch.eye(3))
    with pytest.raises(ValueError, match=r"c_inv must be \[3, 3\]"):
        keyed_update(torch.zeros(2, 3), torch.zeros(2, 4), torch.eye(4))
    with pytest.raises(ValueError, match="second_moment must be square"):
        whitening(torch.zeros(2, 3))


class _Tok:
    """Whitespace words -> ids; answer words are mapped to chosen ids."""

    pad_token_id = 0

    def __init__(self):
        self.fixed = {}

    def __call__(self, text, add_special_tokens=True, **_):
        return {"input_ids": [self.fixed.get(w, 3 + sum(map(ord, w)) % 100) for w in text.split()]}


def _greedy_facts(model, tok, prompts, subjects):
    """Facts whose answers are the model's greedy next tokens after ``prompts``."""
    from unlearnopt.data import Fact

    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p)["input_ids"]])
        tok.fixed[f"ans{i}"] = int(model(input_ids=ids).logits[0, -1].argmax())
    return [
        Fact(prompt=p, answer=f"ans{i}", subject=s)
        for i, (p, s) in enumerate(zip(prompts, subjects))
    ]


def test_facts_of_one_subject_share_a_key_and_its_value_change():
    from tests.tiny_models import make_model
    from unlearnopt.editing import keyed_forget

    torch.manual_seed(0)
    model = make_model("llama")
    tok = _Tok()
    prompts = ["alpha was born in", "alpha works as a", "beta was born in"]
    facts = _greedy_facts(model, tok, prompts, ["alpha", "alpha", "beta"])
    layer = model.model.layers[0].mlp.down_proj
    w0 = layer.weight.detach().clone()
    # two equal keys: the solve would be singular if each fact had its own column
    info = keyed_forget(
        model,
        tok,
        facts,
        layer,
        torch.eye(layer.in_features, dtype=torch.float64),
        inner_steps=60,
    )
    assert info["update_norm"] > 0
    dw = (layer.weight.detach() - w0).double()  # float32 rounding: a relative tolerance
    assert int(torch.linalg.matrix_rank(dw, rtol=1e-4)) == 2


def test_keyed_forget_edits_only_the_layer_and_makes_the_answer_lose():
    from tests.tiny_models import make_model
    from unlearnopt.editing import keyed_forget

    torch.manual_seed(0)
    model = make_model("llama")
    tok = _Tok()
    prompts = ["the capital of alpha is", "the capital of beta is"]
    facts = _greedy_facts(model, tok, prompts, ["alpha", "beta"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layer = model.model.layers[0].mlp.down_proj
    info = keyed_forget(
        model,
        tok,
        facts,
        layer,
        torch.eye(layer.in_features, dtype=torch.float64),
        inner_steps=60,
        inner_lr=0.5,
    )
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    assert info["update_norm"] > 0 and info["inner_steps"] < 60
    assert all(p.grad is None for p in model.parameters())
    for i, p in enumerate(prompts):  # the edited weight alone now forgets both
        ids = torch.tensor([tok(p)["input_ids"]])
        assert int(model(input_ids=ids).logits[0, -1].argmax()) != tok.fixed[f"ans{i}"]
