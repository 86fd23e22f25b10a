"""Triton kernels (one module per op, named like the op).

They run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
``triton`` was first imported (that is how CI tests them without a GPU).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        return f"cannot import triton: {exc}"
    return None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors on ``device``, and if not, why."""
    err = _triton_import_error()
    if err is not None:
        return False, err
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreting():
        return True, ""
    return False, f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
