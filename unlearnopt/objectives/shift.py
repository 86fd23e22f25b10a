"""Next-token alignment of labels, as Hugging Face causal LMs do it.

Position t of the logits predicts token t + 1, so the loss pairs ``logits[:, t]`` with
``labels[:, t + 1]``. Rather than slicing the logits (``logits[:, :-1]`` is a strided view
the loss would copy, ``[B, T-1, V]``), the labels are shifted left and padded with
``ignore_index``: the last position then contributes nothing, and the logits are used as
they are. The result is identical to the sliced form.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels [B, T]`` -> ``[B, T]`` int64 with ``out[:, t] = labels[:, t + 1]`` and
    ``out[:, -1] = ignore_index``."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1).long()


def check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """logits ``[B, T, V]`` must match labels ``[B, T]``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [B, T, V] tensor, got {shape}")
    if tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match labels "
            f"{tuple(labels.shape)}: expected logits [B, T, V] with labels [B, T]"
        )
