"""Backend dispatch: explicit choice, the environment variable, and auto fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from unlearnopt.ops import _backend


def test_env_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")
    assert _backend.resolve_backend(None, torch.device("cpu")) == "reference"


def test_unknown_backend_names_the_source(monkeypatch):
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "fast")
    with pytest.raises(ValueError, match="UNLEARNOPT_BACKEND must be one of"):
        _backend.resolve_backend(None, torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve_backend("fast", torch.device("cpu"))


def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' requested but unavailable"):
        _backend.resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        _backend.resolve_backend("native", torch.device("meta"))


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    from unlearnopt import native

    monkeypatch.setattr(native, "native_error", lambda: "no compiler")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert _backend.resolve_backend("auto", torch.device("cpu")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        assert _backend.resolve_backend("auto", torch.device("cpu")) == "reference"


# ---------------------------------------------------------------------------------------
# One dispatch rule for every op: a named backend is never replaced.
# ---------------------------------------------------------------------------------------


def _f64_calls():
    """One float64 call per op whose kernels compute in float32: name -> call(backend)."""
    from unlearnopt import ops

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 2, -100, 3])
    h = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64)
    grads = [[torch.randn(7, generator=g, dtype=torch.float64)] for _ in range(2)]
    return {
        "unlearning_cross_entropy": lambda b: ops.unlearning_cross_entropy(
            logits, labels, backend=b
        ),
        "fused_linear_unlearning_cross_entropy": lambda b: (
            ops.fused_linear_unlearning_cross_entropy(h, w, labels, backend=b)
        ),
        "masked_kl": lambda b: ops.masked_kl(logits, logits.flip(0), backend=b),
        "fused_linear_masked_kl": lambda b: ops.fused_linear_masked_kl(h, w, h, w + 0.1, backend=b),
        "grad_gram": lambda b: ops.grad_gram(grads, backend=b).total,
    }


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("UNLEARNOPT_BACKEND", raising=False)


@pytest.mark.parametrize("op", list(_f64_calls()))
def test_named_backend_refuses_float64(op, fresh_warnings):
    from tests.conftest import backend_skip_reason

    if backend_skip_reason("native") is not None:
        pytest.skip("needs the native kernels")
    call = _f64_calls()[op]
    with pytest.raises(ValueError, match=rf"{op}: backend='native' cannot run float64"):
        call("native")


@pytest.mark.parametrize("op", list(_f64_calls()))
def test_env_named_backend_refuses_float64(op, fresh_warnings, monkeypatch):
    from tests.conftest import backend_skip_reason

    if backend_skip_reason("native") is not None:
        pytest.skip("needs the native kernels")
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "native")
    with pytest.raises(ValueError, match="cannot run float64"):
        _f64_calls()[op](None)


@pytest.mark.parametrize("op", list(_f64_calls()))
def test_auto_runs_float64_on_reference_with_one_warning(op, fresh_warnings):
    call = _f64_calls()[op]
    want = call("reference")
    with pytest.warns(
        RuntimeWarning,
        match=rf"unlearnopt.{op}: the \w+ kernels cannot run "
        "float64",
    ):
        got = call("auto")
    assert got.dtype == torch.float64
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: not again
        call("auto")


def test_grad_gram_objectives_above_the_kernel_limit(fresh_warnings):
    from tests.conftest import backend_skip_reason
    from unlearnopt.ops import grad_gram
    from unlearnopt.ops.grad_gram import MAX_OBJECTIVES

    k = MAX_OBJECTIVES["native"] + 1
    grads = [[torch.full((3,), float(i))] for i in range(k)]
    want = grad_gram(grads, backend="reference").total
    if backend_skip_reason("native") is None:
        with pytest.raises(
            ValueError, match=f"backend='native' cannot run more than {k - 1} objectives"
        ):
            grad_gram(grads, backend="native")
        with pytest.warns(RuntimeWarning, match="more than 64 objectives"):
            assert torch.equal(grad_gram(grads, backend="auto").total, want)
    if backend_skip_reason("triton") is None:
        with pytest.raises(ValueError, match="backend='triton' cannot run more than 16"):
            grad_gram(grads[:17], backend="triton")


def test_grad_gram_with_a_graph_needs_the_reference(fresh_warnings):
    from tests.conftest import backend_skip_reason
    from unlearnopt.ops import grad_gram

    if backend_skip_reason("native") is not None:
        pytest.skip("needs the native kernels")
    leaf = [[torch.randn(5, requires_grad=True)] for _ in range(2)]
    with pytest.raises(ValueError, match="gradients that require grad"):
        grad_gram(leaf, backend="native")
    with pytest.warns(RuntimeWarning, match="gradients that require grad"):
        grad_gram(leaf, backend="auto").total[0, 1].backward()
    assert torch.equal(leaf[0][0].grad, leaf[1][0].detach())


def test_kernel_entries_share_one_name_on_both_backends():
    from tests.conftest import backend_skip_reason

    for op, entry in _backend.KERNEL_ENTRIES.items():
        if backend_skip_reason("native") is None:
            assert _backend.kernel(op, "native") is getattr(torch.ops.unlearnopt_native, entry)
        if backend_skip_reason("triton") is None:
            assert _backend.kernel(op, "triton").__name__ == entry
    with pytest.raises(ValueError, match="no kernel for backend 'reference'"):
        _backend.kernel("masked_kl", "reference")
