"""Backend dispatch shared by every op: which implementation runs one call, and its kernel.

Three backends: ``triton`` (``unlearnopt.kernels``, CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``native`` (the C++ kernels in ``csrc/``, CPU tensors) and
``reference`` (plain PyTorch, any device, any float dtype, differentiable twice).

Rules, for every op:

* The backend asked for is the ``backend=`` argument, else the ``UNLEARNOPT_BACKEND``
  environment variable, else ``auto``. Anything but ``auto|triton|native|reference`` raises.
* A named backend (by argument or by the environment variable) is never replaced. If it is
  not available here (Triton not importable, a non-CPU tensor for ``native``, the C++ build
  failed) it raises ``RuntimeError``; if its kernels cannot run these inputs (float64, more
  objectives than a kernel holds, gradients that need a graph) it raises ``ValueError``
  that says why and which backend can.
* ``auto`` picks Triton for CUDA tensors and the native kernels for CPU tensors. When that
  backend is unavailable, or cannot run the inputs, ``auto`` uses the reference and warns
  once per reason (a ``RuntimeWarning``), so a silent slowdown cannot go unnoticed.

Kernel entry points share one name on both backends: ``kernel(op, backend)`` returns
``unlearnopt.kernels.<op>.<entry>`` for Triton and ``torch.ops.unlearnopt_native.<entry>``
for the C++ build, with ``<entry> = KERNEL_ENTRIES[op]``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "native", "reference")
#: The kernel entry point of each op, the same name in ``unlearnopt.kernels.<op>`` (Triton)
#: and in ``torch.ops.unlearnopt_native`` (C++). The fused-linear ops use their loss's rows.
KERNEL_ENTRIES = {
    "unlearning_cross_entropy": "unlearning_cross_entropy_rows",
    "masked_kl": "masked_kl_rows",
    "grad_gram": "grad_gram_per_tensor",
    "min_norm": "min_norm_batched",
}
_warned: set[tuple[str, ...]] = set()


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside unlearnopt and torch (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


# The package directories of unlearnopt and torch (the op wrappers add torch frames).
_INTERNAL = (
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ""),
    os.path.join(os.path.dirname(torch.__file__), ""),
)


def _warn_once(key: tuple[str, ...], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else ``UNLEARNOPT_BACKEND``, else ``auto``."""
    name = backend if backend is not None else os.environ.get("UNLEARNOPT_BACKEND", "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else "UNLEARNOPT_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def _unavailable(name: str, device: torch.device) -> str | None:
    """Why the ``triton`` or ``native`` kernels cannot run on ``device`` (None if they can)."""
    if name == "triton":
        from unlearnopt.kernels import triton_usable

        ok, why = triton_usable(device)
        return None if ok else why
    if device.type != "cpu":
        return f"the native kernels run on CPU tensors only, got device {device}"
    from unlearnopt.native import native_error

    err = native_error()
    return None if err is None else f"the C++ extension failed to build: {err}"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The available backend (``triton``, ``native`` or ``reference``) for tensors on ``device``.

    Raises ``RuntimeError`` when a named backend is unavailable; ``auto`` falls back to the
    reference with one warning.
    """
    name = requested_backend(backend)
    if name == "reference":
        return name
    if name != "auto":
        why = _unavailable(name, device)
        if why is not None:
            raise RuntimeError(f"backend={name!r} requested but unavailable: {why}")
        return name
    preferred = {"cuda": "triton", "cpu": "native"}.get(device.type)
    if preferred is None:
        return "reference"
    why = _unavailable(preferred, device)
    if why is None:
        return preferred
    _warn_once(
        ("unavailable", preferred),
        f"unlearnopt: {preferred} kernels unavailable ({why}); using the slower reference backend",
    )
    return "reference"


def choose_backend(
    op: str,
    backend: str | None,
    device: torch.device,
    unsupported: Callable[[str], str | None] | None = None,
) -> str:
    """The backend that runs one call of ``op`` on tensors on ``device``.

    Args:
        op: the public op's name, for messages (``"grad_gram"``, ...).
        backend: the ``backend=`` argument (None: ``UNLEARNOPT_BACKEND``, else ``auto``).
        device: where the inputs live.
        unsupported: given ``"triton"`` or ``"native"``, a short fixed phrase saying which
            inputs that backend's kernels cannot run (``"float64 inputs"``), or None when
            they can. The phrase is the warn-once key, so it should not vary per call.

    Returns:
        ``"triton"``, ``"native"`` or ``"reference"``.

    Raises:
        ValueError: an unknown backend name, or a named backend whose kernels cannot run
            these inputs.
        RuntimeError: a named backend that is not available here.
    """
    name = requested_backend(backend)
    chosen = resolve_backend(name, device)
    if chosen == "reference" or unsupported is None:
        return chosen
    gap = unsupported(chosen)
    if gap is None:
        return chosen
    if name != "auto":
        raise ValueError(
            f"{op}: backend={chosen!r} cannot run {gap}; pass backend='reference' "
            "(or 'auto', which falls back to it with a warning)"
        )
    _warn_once(
        (op, chosen, gap),
        f"unlearnopt.{op}: the {chosen} kernels cannot run {gap}; using the reference "
        "backend for them",
    )
    return "reference"


def float64_gap(*tensors: torch.Tensor | None) -> Callable[[str], str | None]:
    """``unsupported`` for ops whose kernels compute in float32: float64 inputs."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return lambda _backend: "float64 inputs (the kernels compute in float32)" if wide else None


def kernel(op: str, backend: str):
    """The kernel entry point of ``op`` on ``backend`` (``triton`` or ``native``)."""
    entry = KERNEL_ENTRIES[op]
    if backend == "triton":
        return getattr(importlib.import_module(f"unlearnopt.kernels.{op}"), entry)
    if backend == "native":
        from unlearnopt.native import native_ops

        return getattr(native_ops(), entry)
    raise ValueError(f"{op}: no kernel for backend {backend!r} (expected 'triton' or 'native')")
