"""Input validation shared by the public ops: clear errors that name the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float32/bfloat16/float16/float64), "
                         f"got dtype {t.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "expected the same device")


def check_labels(labels, expected_shape: torch.Size, vocab: int, ignore_index: int,
                 logits_name: str = "logits") -> None:
    """labels: integer tensor of ``expected_shape``, values in [0, vocab) or ``ignore_index``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels has shape {tuple(labels.shape)} but {logits_name} needs "
                         f"{tuple(expected_shape)} (the shape of {logits_name} without its last dim)")
    # One small reduction; skipped while a CUDA graph is captured (no host sync allowed there).
    if labels.numel() and not (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {value}")


def check_alpha(alpha) -> None:
    if not isinstance(alpha, (int, float)) or not (0.0 < float(alpha) <= 1.0):
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
