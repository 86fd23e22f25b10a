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

DEVICE = torch.device(
    os.environ.get("UNLEARNOPT_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
)
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


def run_two_processes(worker: str, *args: str, timeout: int = 240) -> None:
    """Run ``tests/distributed/<worker>`` on 2 CPU processes (gloo) through
    ``torch.distributed.run``; fail with the end of its output if it fails."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", UNLEARNOPT_BACKEND="reference")
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(root / "tests" / "distributed" / worker),
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
