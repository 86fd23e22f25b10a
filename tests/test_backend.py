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
