"""``MultiObjectiveUnlearner``: failures leave everything untouched, state round-trips,
accumulation equals the big batch, schedulers / clipping / AMP / ``backward()`` work, the
method registry, and DDP on two CPU processes equals one process on the whole batch."""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import pytest
import torch

from tests.assertions import assert_within
from tests.conftest import run_two_processes
from tests.tiny_models import make_batch, make_model
from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.methods import Method, Objective, available_methods, get_method, register_method
from unlearnopt.objectives import token_loss
from unlearnopt.unlearner import MultiObjectiveUnlearner, UnlearningStepError


@pytest.fixture(scope="module")
def llama32():
    model = make_model("llama")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(9)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model, ref


def fresh(llama32, dtype=torch.float32):
    model, ref = llama32
    return copy.deepcopy(model).to(dtype), copy.deepcopy(ref).to(dtype)


def batches(dtype=torch.float32, forget_size=3, retain_size=4):
    return (
        make_batch("llama", batch=forget_size, seq=8, seed=1, dtype=dtype),
        make_batch("llama", batch=retain_size, seq=8, seed=2, dtype=dtype),
    )


def snapshot(model, opt):
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_same(a, b):
    ma, oa, ga = a
    mb, ob, gb = b
    for k in ma:
        assert_within(f"parameter {k}", ma[k], mb[k], 0.0)
    assert repr(oa["param_groups"]) == repr(ob["param_groups"])
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for name, v in oa["state"][k].items():
            assert_within(f"optimizer state {k}/{name}", v, ob["state"][k][name], 0.0)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None), "p.grad appeared or vanished"
        if x is not None:
            assert_within("p.grad", x, y, 0.0)


def assert_close_update(actual, expected, tol=2e-5):
    """Updates equal up to float32 rounding relative to the largest entry (the fused
    cross-entropy's reference computes in float32 even for float64 logits)."""
    bound = tol * float(expected.detach().abs().max()) + 1e-300
    assert_within("update", actual, expected, bound)


# -- failures leave the parameters, the optimizer state and p.grad untouched --------------------


class ScaledLoss(Method):
    """grad_diff with the retain loss multiplied by ``factor`` (to force non-finite values)."""

    name = "test_scaled"
    defaults: ClassVar[dict] = {"factor": 1.0, "logits_scale": 1.0}

    def objectives(self):
        f, s = self.config["factor"], self.config["logits_scale"]
        return [
            Objective("forget_ga", "forget", lambda ctx: token_loss(ctx.logits, ctx.labels, "ga")),
            Objective(
                "retain_big",
                "retain",
                lambda ctx: (
                    token_loss(ctx.logits, ctx.labels, "nll") * f
                    + (ctx.logits * s).sum() * 0
                    + (ctx.logits.sum() * (s - 1.0))
                ),
            ),
        ]

    def aggregator(self):
        return Aggregator(FixedWeights([1.0, 1.0]))


register_method("test_scaled", ScaledLoss, overwrite=True)


class NoLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kw):
        return {"hidden": self.inner(**kw).logits}


def started(llama32, method="grad_diff", **kw):
    """A model and AdamW that already took one step (non-trivial optimizer state), with
    p.grad holding values that must survive a failed step."""
    model, ref = fresh(llama32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forget, retain = batches()
    MultiObjectiveUnlearner(model, opt, "grad_diff").step(forget, retain)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    unlearner = MultiObjectiveUnlearner(model, opt, method, ref_model=ref, **kw)
    return model, opt, unlearner, forget, retain


@pytest.mark.parametrize(
    "case",
    [
        "nan_loss",
        "inf_loss",
        "inf_gradient",
        "no_labels",
        "bad_labels_shape",
        "float_labels",
        "not_a_dict",
        "missing_retain",
        "label_out_of_vocab",
        "forget_all_ignored",
        "retain_all_ignored",
    ],
)
def test_failed_step_changes_nothing(llama32, case):
    opts = {
        "nan_loss": {"factor": float("nan")},
        "inf_loss": {"factor": float("inf")},
        "inf_gradient": {"logits_scale": 1e30},
    }.get(case)
    method = "test_scaled" if opts else "grad_diff"
    model, opt, unlearner, forget, retain = started(llama32, method, **(opts or {}))
    before = snapshot(model, opt)
    if case == "no_labels":
        retain = {k: v for k, v in retain.items() if k != "labels"}
    elif case == "bad_labels_shape":
        retain = dict(retain, labels=retain["labels"][:, :-1])
    elif case == "float_labels":
        retain = dict(retain, labels=retain["labels"].float())
    elif case == "not_a_dict":
        retain = [retain["input_ids"]]
    elif case == "missing_retain":
        retain = None
    elif case == "label_out_of_vocab":
        retain = dict(retain, labels=retain["labels"].clone().fill_(10_000))
    elif case == "forget_all_ignored":  # only the first position labelled: shifted away
        labels = torch.full_like(forget["labels"], -100)
        labels[:, 0] = forget["input_ids"][:, 0]
        forget = dict(forget, labels=labels)
    elif case == "retain_all_ignored":
        retain = dict(retain, labels=torch.full_like(retain["labels"], -100))
    expected = {
        "nan_loss": (UnlearningStepError, "non-finite loss.*retain_big"),
        "inf_loss": (UnlearningStepError, "non-finite loss"),
        "inf_gradient": (UnlearningStepError, "non-finite gradient"),
        "no_labels": (TypeError, "labels"),
        "bad_labels_shape": (ValueError, "same"),
        "float_labels": (ValueError, "integer"),
        "not_a_dict": (TypeError, "dict"),
        "missing_retain": (ValueError, "needs a retain batch"),
        "label_out_of_vocab": (ValueError, "labels must lie"),
        "forget_all_ignored": (ValueError, "forget batch has no labelled token"),
        "retain_all_ignored": (ValueError, "retain batch has no labelled token"),
    }[case]
    with pytest.raises(expected[0], match=expected[1]):
        unlearner.step(forget=forget, retain=retain)
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("method", ["npo", "mollm", "ga_kl"])
def test_reference_with_another_vocabulary_fails_at_construction(llama32, method):
    model, ref = fresh(llama32)
    ref.resize_token_embeddings(ref.config.vocab_size * 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="vocabulary of 256 tokens but model has 128"):
        MultiObjectiveUnlearner(model, opt, method, ref_model=ref)


@pytest.mark.parametrize("method", ["npo", "mollm"])
def test_non_finite_forget_loss_is_named(llama32, method, monkeypatch):
    """A NaN parameter makes every loss NaN; the error names the forget objective too."""
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")
    model, ref = fresh(llama32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    forget_name = {"npo": "forget_npo", "mollm": "forget_uce"}[method]
    options = {"retain_weight": 1.0} if method == "npo" else {}
    unlearner = MultiObjectiveUnlearner(model, opt, method, ref_model=ref, **options)
    with pytest.raises(UnlearningStepError, match=f"non-finite loss.*{forget_name}"):
        unlearner.step(*batches())
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0, equal_nan=True)
        assert p.grad is None


def test_model_without_logits_raises_and_changes_nothing(llama32):
    model, _ = fresh(llama32)
    wrapped = NoLogits(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    before = snapshot(wrapped, opt)
    with pytest.raises(TypeError, match="without logits"):
        MultiObjectiveUnlearner(wrapped, opt, "ga").step(*batches())
    assert_same(before, snapshot(wrapped, opt))


def test_constructor_errors(llama32):
    model, ref = fresh(llama32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown method"):
        MultiObjectiveUnlearner(model, opt, "nope")
    with pytest.raises(TypeError, match="unknown option"):
        MultiObjectiveUnlearner(model, opt, "mollm", ref_model=ref, bogus=1)
    with pytest.raises(ValueError, match="needs a reference"):
        MultiObjectiveUnlearner(model, opt, "mollm")
    with pytest.raises(ValueError, match="shares parameters"):
        MultiObjectiveUnlearner(model, opt, "mollm", ref_model=model)
    with pytest.raises(ValueError, match="normalize"):
        MultiObjectiveUnlearner(model, opt, "mollm", ref_model=ref, normalize="max")
    with pytest.raises(ValueError, match="max_grad_norm"):
        MultiObjectiveUnlearner(model, opt, "ga", max_grad_norm=-1)
    with pytest.raises(ValueError, match="accumulate"):
        MultiObjectiveUnlearner(model, opt, "ga", accumulate=0)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="not parameters of model"):
        MultiObjectiveUnlearner(model, other, "ga")


# -- state, accumulation, schedulers, clipping ---------------------------------------------------


@pytest.mark.parametrize("method", ["mollm", "npo"])
def test_state_dict_round_trip_mid_run(llama32, method):
    model, ref = fresh(llama32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    u = MultiObjectiveUnlearner(model, opt, method, ref_model=ref, max_grad_norm=1.0)
    forget, retain = batches()
    for _ in range(2):
        u.step(forget, retain)
    state = copy.deepcopy(u.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)  # overwritten by the load
    u2 = MultiObjectiveUnlearner(model2, opt2, method, ref_model=ref, max_grad_norm=1.0)
    u2.load_state_dict(state)
    assert u2.steps == 2 and opt2.param_groups[0]["lr"] == 1e-3
    for _ in range(2):
        s1, s2 = u.step(forget, retain), u2.step(forget, retain)
        assert s1 == s2
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    model3 = copy.deepcopy(model)
    with pytest.raises(ValueError, match="for method"):
        MultiObjectiveUnlearner(
            model3, torch.optim.SGD(model3.parameters(), lr=1), "ga"
        ).load_state_dict(state)


@pytest.mark.parametrize("method", ["grad_diff", "mollm", "npo"])
def test_accumulation_equals_big_batch(llama32, method):
    forget, retain = batches(torch.float64, forget_size=3, retain_size=4)
    results = []
    for how in ("big", "accumulate", "lists"):
        model, ref = fresh(llama32, torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        opts = {"retain_weight": 1.0} if method == "npo" else {}
        u = MultiObjectiveUnlearner(
            model, opt, method, ref_model=ref, accumulate=2 if how == "accumulate" else 1, **opts
        )
        if how == "lists":  # uneven micro-batches, and the padded row alone in one of them
            f = [{k: v[:1] for k, v in forget.items()}, {k: v[1:] for k, v in forget.items()}]
            r = [{k: v[:3] for k, v in retain.items()}, {k: v[3:] for k, v in retain.items()}]
        else:
            f, r = forget, retain
        stats = u.step(f, r)
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (s0, p0) = results[0]
    init = [p.detach() for p in fresh(llama32, torch.float64)[0].parameters()]
    for s, ps in results[1:]:
        for k in s0:
            assert abs(s[k] - s0[k]) <= 1e-5 * (1 + abs(s0[k])), k
        for a, b, i in zip(ps, p0, init):
            assert_close_update(a - i, b - i)


def test_lr_scheduler_and_clipping(llama32):
    model, _ = fresh(llama32, torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    u = MultiObjectiveUnlearner(model, opt, "grad_diff", max_grad_norm=0.1)
    forget, retain = batches(torch.float64)
    for expected_lr in (0.2, 0.1, 0.2 / 3):
        before = [p.detach().clone() for p in model.parameters()]
        stats = u.step(forget, retain)
        sched.step()
        assert abs(stats["lr"] - expected_lr) < 1e-12
        moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
        assert stats["grad_norm/direction"] > 0.1  # so clipping was active
        assert abs(float(moved.detach()) - expected_lr * 0.1) < 1e-6 * expected_lr
    assert u.param_groups is opt.param_groups


def test_backward_api_equals_step(llama32):
    forget, retain = batches(torch.float64)
    model, ref = fresh(llama32, torch.float64)
    u = MultiObjectiveUnlearner(
        model, torch.optim.SGD(model.parameters(), lr=0.5), "mollm", ref_model=ref
    )
    expected = u.step(forget, retain)

    model2, ref2 = fresh(llama32, torch.float64)
    u2 = MultiObjectiveUnlearner(
        model2, torch.optim.SGD(model2.parameters(), lr=0.5), "mollm", ref_model=ref2
    )
    with pytest.raises(ValueError, match="backward"):
        u2.step()
    lf = model2(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    lr_ = model2(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    with torch.no_grad():
        ref_lr = ref2(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    from unlearnopt.objectives import kl_to_reference

    u2.backward(
        {
            "retain_nll": token_loss(lr_, retain["labels"], "nll"),  # any order
            "forget_uce": token_loss(lf, forget["labels"], "uce"),
            "retain_kl": kl_to_reference(lr_, ref_lr, retain["labels"]),
        }
    )
    stats = u2.step()
    for k in expected:
        assert abs(stats[k] - expected[k]) <= 1e-5 * (1 + abs(expected[k])), k
    init = fresh(llama32, torch.float64)[0].parameters()
    for a, b, i in zip(model.parameters(), model2.parameters(), init):
        assert_close_update(b.detach() - i, a.detach() - i)


def test_grad_scaler_and_autocast(llama32):
    forget, retain = batches()
    model, ref = fresh(llama32)
    u = MultiObjectiveUnlearner(
        model, torch.optim.SGD(model.parameters(), lr=0.1), "mollm", ref_model=ref
    )
    plain = u.step(forget, retain)
    model2, ref2 = fresh(llama32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    u2 = MultiObjectiveUnlearner(
        model2, torch.optim.SGD(model2.parameters(), lr=0.1), "mollm", ref_model=ref2, scaler=scaler
    )
    scaled = u2.step(forget, retain)
    assert scaled["skipped"] == 0.0
    for k in ("weight/forget_uce", "grad_norm/retain_nll", "grad_norm/direction"):
        assert abs(scaled[k] - plain[k]) <= 1e-4 * (1 + abs(plain[k])), k
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert "scaler" in u2.state_dict()
    # An overflowing step is skipped as GradScaler does: nothing moves, the scale halves.
    bad = MultiObjectiveUnlearner(
        model2, u2.optimizer, "test_scaled", scaler=scaler, logits_scale=1e30
    )
    before = snapshot(model2, u2.optimizer)
    scale = scaler.get_scale()
    stats = bad.step(forget, retain)
    assert stats["skipped"] == 1.0 and scaler.get_scale() == scale / 2
    assert_same(before, snapshot(model2, u2.optimizer))
    # bf16 autocast: the forward passes inherit it; the step is finite.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = u.step(forget, retain)
    assert all(math.isfinite(v) for v in stats.values())


def test_registry():
    assert {"ga", "grad_diff", "ga_kl", "npo", "mollm", "siu", "ofmu"} <= set(available_methods())
    assert get_method("mollm").name == "mollm"

    class Mine(Method):
        name = "mine_test"

    register_method("mine_test", Mine, overwrite=True)
    assert get_method("mine_test") is Mine
    with pytest.raises(ValueError, match="already registered"):
        register_method("mine_test", type("Other", (Method,), {}))
    with pytest.raises(TypeError, match="subclass of Method"):
        register_method("x", object)


def test_frozen_parameters_get_no_gradient(llama32):
    model, ref = fresh(llama32)
    for name, p in model.named_parameters():
        if "layers.0" in name:
            p.requires_grad_(False)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    MultiObjectiveUnlearner(model, opt, "mollm", ref_model=ref).step(*batches())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None


# -- DDP on two CPU processes ----------------------------------------------------------------------


@pytest.mark.distributed
def test_ddp_matches_single_process(tmp_path):
    methods = ["mollm", "grad_diff", "npo", "ofmu"]
    out = tmp_path / "result.pt"
    run_two_processes("unlearner_worker.py", str(out), ",".join(methods))
    res = torch.load(out, weights_only=False)
    for method in methods:
        single, ranks = res[method]["single"], res[method]["ranks"]
        for rank_stats, rank_params in ranks:
            for k, v in single["stats"].items():
                assert abs(rank_stats[k] - v) <= 1e-5 * (1 + abs(v)), (method, k)
            for a, b, i in zip(rank_params, single["params"], res["init"]):
                assert_close_update(a - i, b - i)
