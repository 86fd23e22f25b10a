"""Loader of the C++ CPU kernels in ``csrc/``.

Every ``csrc/*.cpp`` is compiled into one extension, once, with
``torch.utils.cpp_extension.load`` (cached under the torch extensions directory, so a
second process reuses the build). Each source registers its functions with
``TORCH_LIBRARY_FRAGMENT(unlearnopt_native, m)``; callers reach them as
``torch.ops.unlearnopt_native.<name>`` through :func:`native_ops`.

``UNLEARNOPT_NATIVE_SOURCES`` (comma-separated file names in ``csrc/``) builds only those
files into a separately named extension: a help while writing a new kernel, so that one
unfinished source cannot break everybody else's build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
_NAMESPACE = "unlearnopt_native"


def _sources() -> list[Path]:
    only = os.environ.get("UNLEARNOPT_NATIVE_SOURCES", "").strip()
    if only:
        return [CSRC / name.strip() for name in only.split(",") if name.strip()]
    return sorted(CSRC.glob("*.cpp"))


@functools.cache
def _build() -> str | None:
    """Build and load the extension; return None on success, else the reason it failed."""
    if os.environ.get("UNLEARNOPT_DISABLE_NATIVE", "0") not in ("", "0"):
        return "disabled by UNLEARNOPT_DISABLE_NATIVE"
    sources = _sources()
    if not sources or not all(s.exists() for s in sources):
        return f"C++ sources not found under {CSRC} (install the project with `pip install -e .`)"
    try:
        from torch.utils.cpp_extension import load

        # One name per source set: the dev subset must not overwrite the full build.
        tag = hashlib.sha1(",".join(s.name for s in sources).encode()).hexdigest()[:8]
        load(
            name=f"unlearnopt_native_{tag}",
            sources=[str(s) for s in sources],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("UNLEARNOPT_VERBOSE_BUILD", "0") not in ("", "0"),
        )
    except Exception as exc:  # noqa: BLE001 - compiler missing, ninja missing, compile error
        return (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        )
    return None


def native_error() -> str | None:
    """None if the native kernels are loaded (building them on first call), else why not."""
    return _build()


def native_ops():
    """The ``torch.ops.unlearnopt_native`` namespace; raises if the build failed."""
    err = native_error()
    if err is not None:
        raise RuntimeError(f"unlearnopt native kernels unavailable: {err}")
    return getattr(torch.ops, _NAMESPACE)


def warn_unavailable() -> None:
    err = native_error()
    if err is not None:
        warnings.warn(
            f"unlearnopt: native kernels unavailable: {err}", RuntimeWarning, stacklevel=2
        )
