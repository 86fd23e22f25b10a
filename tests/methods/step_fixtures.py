"""What the method step tests share: a tiny model and its reference, forward passes written
out by hand, and the check that an optimizer step applied the expected direction."""

from __future__ import annotations

import copy

import torch

from tests.assertions import assert_within
from tests.tiny_models import make_batch, make_model

LR = 0.5


def _ops_tolerance() -> float:
    """Relative tolerance of the comparison: the ops must do float64 math on float64 input
    to be compared at 1e-9; while the cross-entropy reference computes in float32 (it
    does at the time of writing), the update can only match to float32 rounding."""
    from unlearnopt.ops.unlearning_cross_entropy import unlearning_cross_entropy

    x = torch.randn(2, 5, dtype=torch.float64)
    out = unlearning_cross_entropy(x, torch.tensor([1, 2]))
    return 1e-9 if out.dtype == torch.float64 else 2e-5


TOL = _ops_tolerance()


def logits_of(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, use_cache=False).logits


def ref_logits_of(model, ref, batch):
    with torch.no_grad():
        if ref is not None:
            return logits_of(ref, batch)
        with model.disable_adapter():
            return logits_of(model, batch)


def perturbed(model, kind, seed=5, scale=0.05):
    """Move the trained model away from the reference so the KL has a real gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if kind == "lora" and "lora_B" not in name:
                continue
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def setup(kind, dtype=torch.float64, perturb=True):
    model = make_model(kind, dtype=dtype)
    ref = None if kind == "lora" else copy.deepcopy(model)
    if perturb:
        perturbed(model, kind)
    seq = 10 if kind == "llava" else 8
    forget = make_batch(kind, batch=3, seq=seq, seed=1, dtype=dtype)
    retain = make_batch(kind, batch=2, seq=seq, seed=2, dtype=dtype)
    return model, ref, forget, retain


def assert_update(actual, before, d, tol):
    """``actual == before - LR * d`` within ``tol`` relative to the largest step entry."""
    step = LR * d
    bound = tol * (float(step.abs().max()) + 1e-300)
    assert_within("update", actual, before - step, bound)
