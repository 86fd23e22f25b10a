"""The unlearner's fused-linear path (the default) against its logits path
(``fused_linear=False``): every method on every tiny architecture gives the same losses, stats
and parameter updates, with and without gradient accumulation, and never builds the
``[B, T, V]`` logits; an unsupported head falls back with one warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tests.assertions import assert_allclose, assert_within
from tests.tiny_models import KINDS, VOCAB, make_batch, make_model, perturb_lora
from unlearnopt.contract import attach_aux
from unlearnopt.unlearner import MultiObjectiveUnlearner

METHODS = (
    "ga",
    "grad_diff",
    "ga_kl",
    "npo",
    "simnpo",
    "idk_dpo",
    "mollm",
    "siu",
    "ofmu",
    "wga",
    "satimp",
    "ce_u",
)
ARCHS = (*KINDS, "lora_head")
OPTIONS = {
    "npo": {"retain_weight": 1.0},
    "simnpo": {"retain_weight": 1.0, "gamma": 0.5},
    "ofmu": {"inner_lr": 0.1},
    "siu": {"direction": "reverse", "temperature": 1.5},
}


def _batches(kind, size=4, method=None):
    data_kind = "llama" if kind == "lora_head" else kind
    forget = make_batch(data_kind, batch=size, seq=10, seed=1, dtype=torch.float64)
    retain = make_batch(data_kind, batch=size, seq=10, seed=2, dtype=torch.float64)
    if method == "idk_dpo":  # the preferred answers, paired row by row with the forget batch
        idk = make_batch(data_kind, batch=size, seq=8, seed=3, dtype=torch.float64)
        return attach_aux(forget, "idk", idk), retain
    if method != "siu":
        return forget, retain
    g = torch.Generator().manual_seed(7)
    forget["token_mask"] = (torch.rand(forget["labels"].shape, generator=g) < 0.8) & (
        forget["labels"] != -100
    )
    vocab_mask = torch.ones(VOCAB)
    vocab_mask[[3, 9, 40]] = 0.0
    forget["vocab_mask"] = vocab_mask
    return forget, retain


def _models(kind):
    model = make_model(kind, dtype=torch.float64)
    peft = kind in ("lora", "lora_head")
    ref = None if peft else copy.deepcopy(model)
    with torch.no_grad():
        if peft:
            perturb_lora(model)
        else:
            gen = torch.Generator().manual_seed(5)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, ref


def _logits_widths(model):
    """Record the last dim of every output of the output head (V on the logits path)."""
    widths = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, args, out: widths.append(out.shape[-1]))
    return widths


def _run(kind, method, fused, accumulate=1, steps=2, options=None):
    model, ref = _models(kind)
    widths = _logits_widths(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3, momentum=0.5)
    forget, retain = _batches(kind, method=method)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        unlearner = MultiObjectiveUnlearner(
            model,
            opt,
            method,
            ref_model=ref,
            fused_linear=fused,
            accumulate=accumulate,
            **(OPTIONS.get(method, {}) if options is None else options),
        )
        stats = [unlearner.step(forget, retain) for _ in range(steps)]
    fallbacks = [str(w.message) for w in record if "fused-linear path is off" in str(w.message)]
    assert not fallbacks, fallbacks  # no fallback here
    params = [p.detach().clone() for p in model.parameters()]
    return stats, params, widths, unlearner


def _assert_same(got, expected, rtol=1e-9, atol=1e-12):
    (s1, p1), (s2, p2) = got, expected
    for a, b in zip(s1, s2):
        assert a.keys() == b.keys()
        for k in b:
            assert_within(
                f"stat {k}", torch.tensor(a[k]), torch.tensor(b[k]), rtol * (1 + abs(b[k]))
            )
    for i, (a, b) in enumerate(zip(p1, p2)):
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        assert_allclose(f"parameter {i}", a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_fused_linear_step_equals_logits_step(method, kind):
    fused_stats, fused_params, widths, unlearner = _run(kind, method, fused=True)
    assert unlearner.heads.active
    assert widths and VOCAB not in widths, "the fused path built [B, T, V] logits"
    logits_stats, logits_params, widths, _ = _run(kind, method, fused=False)
    assert VOCAB in widths
    _assert_same((fused_stats, fused_params), (logits_stats, logits_params))
    start = [p.detach() for p in _models(kind)[0].parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(fused_params, start))
    assert moved > 1e-4  # the steps did something


def test_fused_linear_exact_ofmu_equals_logits_step():
    """The exact bi-level OFMU (finite-difference Hessian products, rho > 0) on both paths."""
    exact = {"hvp": "finite_difference", "inner_steps": 1, "rho": 0.1}
    fused = _run("llama", "ofmu", fused=True, options=exact)
    _assert_same(fused[:2], _run("llama", "ofmu", fused=False, options=exact)[:2])


@pytest.mark.parametrize("method", METHODS)
def test_fused_linear_with_gradient_accumulation(method):
    """Micro-batches on the fused path equal micro-batches on the logits path (tightly) and
    one big batch on the logits path (to the float32 rounding of the accumulated stats)."""
    kind = "qwen2"
    fused = _run(kind, method, fused=True, accumulate=2)
    _assert_same(fused[:2], _run(kind, method, fused=False, accumulate=2)[:2])
    _assert_same(fused[:2], _run(kind, method, fused=False, accumulate=1)[:2], rtol=1e-5, atol=1e-8)


def test_reference_runs_once_per_repeated_forget_batch():
    model, ref = _models("llama")
    calls = []
    ref.register_forward_pre_hook(lambda m, a: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    unlearner = MultiObjectiveUnlearner(model, opt, "npo", ref_model=ref)
    forget, _ = _batches("llama")
    for _ in range(3):
        unlearner.step(forget)  # the same forget batch
    assert len(calls) == 1
    unlearner.step({k: v.clone() for k, v in forget.items()})  # re-collated: same content
    assert len(calls) == 1
    other = make_batch("llama", batch=4, seq=10, seed=3, dtype=torch.float64)
    unlearner.step(other)  # a new batch
    assert len(calls) == 2
    other_model = copy.deepcopy(model)
    off = MultiObjectiveUnlearner(
        other_model,
        torch.optim.SGD(other_model.parameters(), lr=0.1),
        "npo",
        ref_model=ref,
        ref_cache=False,
    )
    for _ in range(2):
        off.step(forget)
    assert len(calls) == 4


def test_unsupported_head_falls_back_with_one_warning():
    model = make_model("gemma2", dtype=torch.float64)
    ref = copy.deepcopy(model)
    batch = make_batch("llama", dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        unlearner = MultiObjectiveUnlearner(model, opt, "mollm", ref_model=ref)
        for _ in range(2):
            stats = unlearner.step(batch, batch)
    ours = [w for w in record if "fused-linear path is off" in str(w.message)]
    assert len(ours) == 1 and "soft-capping" in str(ours[0].message)
    assert not unlearner.heads.active and stats["skipped"] == 0.0
    expected = copy.deepcopy(make_model("gemma2", dtype=torch.float64))
    opt2 = torch.optim.SGD(expected.parameters(), lr=0.1)
    plain = MultiObjectiveUnlearner(
        expected, opt2, "mollm", ref_model=copy.deepcopy(expected), fused_linear=False
    )
    for _ in range(2):
        plain.step(batch, batch)
    for a, b in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fused_linear_option_is_checked():
    model = make_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="fused_linear"):
        MultiObjectiveUnlearner(model, opt, "ga", fused_linear="yes")
    with pytest.raises(TypeError, match="ref_cache"):
        MultiObjectiveUnlearner(model, opt, "ga", ref_cache=None)


@pytest.mark.distributed
def test_ddp_fused_linear_matches_logits_path(tmp_path):
    """Two ranks under DDP on the fused-linear path equal one process on the logits path."""
    from tests.conftest import run_two_processes

    methods = ["ga", "grad_diff", "ga_kl", "npo", "mollm", "siu"]
    out = tmp_path / "result.pt"
    run_two_processes("fused_linear_worker.py", str(out), ",".join(methods))
    res = torch.load(out, weights_only=False)
    for method in methods:
        single, ranks = res[method]["single"], res[method]["ranks"]
        for rank_stats, rank_params in ranks:
            assert rank_stats.keys() == single["stats"].keys()
            for k, v in single["stats"].items():
                assert abs(rank_stats[k] - v) <= 1e-6 * (1 + abs(v)), (method, k, rank_stats[k], v)
            # As in the DDP test of the logits path: the update to float32 rounding of its
            # largest entry (the Gram and the weights are float32, summed in another order).
            for a, b, i in zip(rank_params, single["params"], res["init"]):
                err = float((a - b).abs().max())
                assert err <= 2e-5 * float((b - i).abs().max()) + 1e-300, (method, err)
