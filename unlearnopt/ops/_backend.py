"""Backend selection shared by every op.

Rules (DESIGN.md): an explicit ``backend=`` wins; otherwise ``UNLEARNOPT_BACKEND``;
otherwise ``auto``. ``auto`` picks Triton for CUDA tensors and the native C++ kernels
for CPU tensors, falling back to the pure-PyTorch reference (with one warning) when
the native extension could not be built. Asking explicitly for a backend that is not
available raises instead of falling back.
"""

from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "triton", "native", "reference")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else ``UNLEARNOPT_BACKEND``, else ``auto``."""
    name = backend if backend is not None else os.environ.get("UNLEARNOPT_BACKEND", "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else "UNLEARNOPT_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Pick the concrete backend (``triton``, ``native`` or ``reference``) for tensors on ``device``."""
    name = requested_backend(backend)
    if name == "reference":
        return name
    if name == "triton":
        from unlearnopt.kernels import triton_usable

        ok, why = triton_usable(device)
        if not ok:
            raise RuntimeError(f"backend='triton' requested but unavailable: {why}")
        return name
    if name == "native":
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors only, got device {device}")
        from unlearnopt.native import native_error

        err = native_error()
        if err is not None:
            raise RuntimeError(f"backend='native' requested but the C++ extension failed to build: {err}")
        return name
    # auto
    if device.type == "cuda":
        from unlearnopt.kernels import triton_usable

        ok, why = triton_usable(device)
        if ok:
            return "triton"
        _warn_once("auto-cuda", f"unlearnopt: Triton unavailable ({why}); using the reference backend")
        return "reference"
    if device.type == "cpu":
        from unlearnopt.native import native_error

        err = native_error()
        if err is None:
            return "native"
        _warn_once(
            "auto-cpu",
            f"unlearnopt: native C++ kernels unavailable ({err}); using the slower reference backend",
        )
        return "reference"
    return "reference"
