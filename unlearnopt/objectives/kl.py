"""Forward KL to the reference model on the labelled tokens (the retain regulariser).

Per token t whose next-token label is not ignored::

    KL_t = sum_v p_ref(v) [log p_ref(v) - log p_theta(v)]

mean over those tokens. Plain PyTorch equivalent::

    m = labels[:, 1:] != -100
    lp, lq = logits[:, :-1].log_softmax(-1), ref_logits[:, :-1].log_softmax(-1)
    ((lq.exp() * (lq - lp)).sum(-1)[m]).mean()

The reference logits never receive a gradient (``masked_kl`` detaches them).
"""

from __future__ import annotations

import torch

from unlearnopt.objectives.shift import IGNORE_INDEX, check_logits, shift_labels
from unlearnopt.ops.masked_kl import masked_kl


def kl_to_reference(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean forward KL(p_ref || p_theta) over the tokens with a (shifted) label.

    Args:
        logits: ``[B, T, V]`` the trained model's logits.
        ref_logits: ``[B, T, V]`` the reference model's logits (detached inside).
        labels: ``[B, T]`` unshifted labels; they only select the tokens (-100 = skipped).

    Returns:
        0-dim float32 (float64 for float64 logits).
    """
    check_logits(logits, labels)
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} must have the shape of logits "
            f"{tuple(logits.shape)}"
        )
    token_mask = shift_labels(labels) != IGNORE_INDEX
    vocab = logits.shape[-1]
    return masked_kl(
        logits.reshape(-1, vocab),
        ref_logits.reshape(-1, vocab),
        token_mask=token_mask.reshape(-1),
        direction="forward",
        reduction="mean",
    )
