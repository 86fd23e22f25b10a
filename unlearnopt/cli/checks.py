"""The command line's argument checks: every one runs before a model is loaded, and a
mistake raises ``CLIError`` (printed as one ``unlearnopt: error: ...`` line, exit status 2)."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _err(msg: str) -> int:
    print(f"unlearnopt: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_options(items: Sequence[str] | None, per_method: bool) -> dict:
    """``key=value`` (``run``) or ``method.key=value`` (``pulse``) options; values are JSON when
    they parse as JSON (numbers, true/false, null), strings otherwise."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise CLIError(
                f"--option {item!r}: expected {'METHOD.KEY=VALUE' if per_method else 'KEY=VALUE'}"
            )
        key, value = item.split("=", 1)
        if per_method:
            if "." not in key:
                raise CLIError(f"--option {item!r}: expected METHOD.KEY=VALUE, e.g. npo.beta=0.2")
            method, key = key.split(".", 1)
            out.setdefault(method, {})[key] = _parse_value(value)
        else:
            out[key] = _parse_value(value)
    return out


def _check_method_options(method: str, options: dict, flag: str):
    """The method class, after checking that it accepts ``options`` (nothing is loaded)."""
    from unlearnopt.editing import EDIT_METHODS
    from unlearnopt.methods import get_method

    if method in EDIT_METHODS:
        from unlearnopt.editing import KeyedEditRun

        cls, check = KeyedEditRun, KeyedEditRun.check_options
    else:
        cls = check = get_method(method)
    try:
        check(**options)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{flag}: {e}") from None
    return cls


def _check_subjects(facts, flag: str, method: str = "keyed") -> None:
    """An edit method keys on each fact's subject: refuse facts whose subject is not in the
    prompt before anything is loaded."""
    for f in facts:
        if not f.subject or f.subject not in f.prompt:
            raise CLIError(
                f"{flag}: --method(s) {method} needs every fact to have a 'subject' that occurs "
                f"in its prompt; {f.id or f.prompt!r} has subject {f.subject!r}"
            )


def _methods_list(text: str, flag: str, extra: Sequence[str] = ()) -> list[str]:
    """The method names of ``text`` ('all': every gradient method), each one of
    ``available_methods()`` or of ``extra`` (e.g. PULSE's edit methods)."""
    from unlearnopt.methods import available_methods

    if flag == "--methods" and text.strip() == "all":
        return available_methods()
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise CLIError(f"{flag} is empty; give a comma-separated list, e.g. ga,mollm")
    known = [*available_methods(), *extra]
    for m in names:
        if m not in known:
            raise CLIError(f"unknown method {m!r}; available: {', '.join(sorted(known))}")
    return names


def _positive(args, name: str, *, integer: bool = False) -> None:
    value = getattr(args, name)
    flag = "--" + name.replace("_", "-")
    if integer and value < 1:
        raise CLIError(f"{flag} must be >= 1, got {value}")
    if not integer and not (math.isfinite(value) and value > 0):
        raise CLIError(f"{flag} must be a positive finite number, got {value}")


def _check_device(name: str) -> None:
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(
            f"--device {name!r} is not a torch device; use e.g. cpu, cuda, cuda:1 or mps"
        ) from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {name}: CUDA is not available (this PyTorch build or "
                "machine has no usable GPU); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return
    backend = (
        getattr(torch.backends, dev.type, None)
        if dev.type == "mps"
        else getattr(torch, dev.type, None)
    )
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise CLIError(f"--device {name}: no {dev.type} device is available; use --device cpu")


def _check_common(args) -> None:
    """Checks shared by every command that loads a model."""
    from unlearnopt.models import check_model_path

    _positive(args, "lr")
    if args.max_grad_norm is not None:
        _positive(args, "max_grad_norm")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    _check_device(args.device)
    if args.model not in (None, "default"):
        check_model_path(args.model)


def _output_dir(text: str) -> Path:
    """``--out`` checked and created before any work, so a run never fails at the end."""
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"--out {out}: the directory is not writable")
    return out
