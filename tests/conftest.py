"""Shared test setup.

Device and dtype grids come from the environment: ``UNLEARNOPT_TEST_DEVICE`` (default
``cuda`` when available, else ``cpu``). Without CUDA, Triton kernels run in the Triton
interpreter on CPU tensors, which needs ``TRITON_INTERPRET=1`` before triton is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

DEVICE = torch.device(os.environ.get("UNLEARNOPT_TEST_DEVICE",
                                     "cuda" if torch.cuda.is_available() else "cpu"))
ALL_BACKENDS = ("reference", "native", "triton")


def backend_skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on the test device here (None if it can)."""
    if backend == "native":
        if DEVICE.type != "cpu":
            return "native kernels are CPU-only"
        from unlearnopt.native import native_error

        return native_error()
    if backend == "triton":
        from unlearnopt.kernels import triton_usable

        ok, why = triton_usable(DEVICE)
        return None if ok else why
    return None


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> str:
    """Every backend in turn; a backend that cannot run here is skipped with its reason."""
    why = backend_skip_reason(request.param)
    if why is not None:
        if request.param == "native" and DEVICE.type == "cpu" and os.environ.get("CI"):
            pytest.fail(f"native build failed in CI: {why}")
        pytest.skip(why)
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
