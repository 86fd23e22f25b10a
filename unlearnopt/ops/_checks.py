"""Input validation shared by the public ops: clear errors that name the argument.

Checks that only look at shapes, dtypes and devices are free and always run. Checks that
look at values need a reduction whose result the host reads: on an accelerator that is a
synchronisation, so each value check says when it runs:

* label range (:func:`check_labels`): eagerly (``ValueError``) for CPU tensors, where
  reading the flag costs nothing; for accelerator tensors not at all by default, and
  every backend instead gives an out-of-range label's token a NaN loss and a NaN gradient
  row (never an out-of-bounds read, never a silently wrong number). The environment
  variable ``UNLEARNOPT_CHECK_LABELS`` overrides this: ``1`` checks eagerly everywhere
  (debugging; one sync per call), ``0`` never (the NaN path then also applies on CPU).
* Gram values (:func:`check_gram_values`): when the caller asks (``min_norm(check=True)``).
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (float32/bfloat16/float16/float64), "
            f"got dtype {t.dtype}"
        )


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "expected the same device"
            )


LABEL_DTYPES = (torch.int64, torch.int32)


def eager_label_check(labels: torch.Tensor) -> bool:
    """Whether :func:`check_labels` reads the label range on the host (see the module doc)."""
    setting = os.environ.get("UNLEARNOPT_CHECK_LABELS", "auto").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        eager = True
    elif setting in ("0", "false", "no", "off"):
        eager = False
    elif setting in ("", "auto"):
        eager = labels.device.type == "cpu"
    else:
        raise ValueError(f"UNLEARNOPT_CHECK_LABELS must be 0, 1 or auto, got {setting!r}")
    # Never while a CUDA graph is captured: a host read is not allowed there.
    return eager and not (labels.is_cuda and torch.cuda.is_current_stream_capturing())


def check_labels(
    labels, expected_shape: torch.Size, vocab: int, ignore_index: int, logits_name: str = "logits"
) -> None:
    """labels: int64/int32 tensor of ``expected_shape``, values in [0, vocab) or
    ``ignore_index`` (the range is read only when :func:`eager_label_check` says so)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"labels must be an int64 or int32 tensor, got dtype {labels.dtype} "
            "(cast with labels.long())"
        )
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {logits_name} needs "
            f"{tuple(expected_shape)} (the shape of {logits_name} without its last dim)"
        )
    if labels.numel() and eager_label_check(labels):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"found {value}"
            )


def check_gram_values(name: str, gram: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``gram`` ``[..., K, K]`` is finite and plausibly a Gram
    matrix: every diagonal entry >= 0, symmetric, and ``|G_ij| <= sqrt(G_ii G_jj)``
    (Cauchy-Schwarz), each up to ``tol * max_i |G_ii|`` with ``tol = 16 eps`` for the
    dtype's eps, at least float32's (a float64 Gram is often a float32 one, widened): the
    rounding of a Gram accumulated in that dtype passes, a clearly impossible one does not.
    One host sync; skipped while a CUDA graph is captured."""
    if not gram.numel() or (gram.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # nothing to check, or no host read allowed (CUDA graph capture)
    g = gram.detach().double()
    finite = torch.isfinite(g).all()
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    diag = g.diagonal(dim1=-2, dim2=-1)
    tol = 16 * max(torch.finfo(gram.dtype).eps, torch.finfo(torch.float32).eps)
    slack = tol * diag.abs().amax(-1)[..., None, None]
    sym = (g - g.transpose(-1, -2)).abs() <= slack
    root = diag.clamp(min=0).sqrt()
    cauchy = ((g + g.transpose(-1, -2)) / 2).abs() <= root[..., :, None] * root[
        ..., None, :
    ] + slack
    nonneg = diag >= -slack[..., 0]
    flags = torch.stack([finite, nonneg.all(), sym.all(), cauchy.all()]).tolist()  # one sync
    if not flags[0]:
        raise ValueError(f"{name} contains NaN or Inf; min_norm needs finite Gram matrices")
    for ok, what in zip(
        flags[1:], ("every diagonal entry >= 0", "symmetric", "|G_ij| <= sqrt(G_ii G_jj)")
    ):
        if not ok:
            raise ValueError(
                f"{name} is not a Gram matrix of real vectors: expected {what} "
                f"(up to rounding, {tol:.0e} relative to the largest diagonal "
                "entry); pass check=False to skip this check"
            )


def check_alpha(alpha) -> None:
    if not isinstance(alpha, (int, float)) or not (0.0 < float(alpha) <= 1.0):
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")


def check_exponent(name: str, value) -> float:
    """A weight exponent (wga / satimp) or similar parameter: a finite number >= 0, returned
    as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 <= float(value) < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_linear_head(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """A linear head's operands: float ``hidden [..., H]``, ``weight [V, H]`` of the same
    dtype, ``bias [V]`` or None."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
