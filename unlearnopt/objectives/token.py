"""Token-level losses on next-token labels: ``nll``, ``ga`` and MOLLM's ``uce``.

All three are means over the non-ignored (shifted) label tokens of the batch, computed by
``unlearnopt.ops.unlearning_cross_entropy`` (fused; float32 math; float64 logits go to the
reference). Per token with label y and p = softmax(logits):

    nll: -log p(y)            ga: +log p(y)            uce: -log(1 - alpha * p(y))

Plain PyTorch equivalent of ``token_loss(logits, labels, "nll")``::

    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
"""

from __future__ import annotations

import torch

from unlearnopt.objectives.shift import IGNORE_INDEX, check_logits, shift_labels
from unlearnopt.ops.unlearning_cross_entropy import unlearning_cross_entropy

TOKEN_MODES = ("nll", "ga", "uce")


def token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "nll",
    alpha: float = 0.5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean next-token loss over the non-ignored tokens.

    Args:
        logits: ``[B, T, V]`` float (any float dtype; float32 math).
        labels: ``[B, T]`` integer, unshifted, ``-100`` = ignored.
        mode: ``"nll"``, ``"ga"`` or ``"uce"``.
        alpha: the ``uce`` parameter (MOLLM: 1/2).
        backend: the op's backend (default: ``UNLEARNOPT_BACKEND`` or automatic);
            ``"reference"`` is plain PyTorch, differentiable any number of times.

    Returns:
        0-dim float32 (float64 for float64 logits); 0 if no token counts.
    """
    check_logits(logits, labels)
    return unlearning_cross_entropy(
        logits,
        shift_labels(labels),
        mode=mode,
        ignore_index=IGNORE_INDEX,
        reduction="mean",
        alpha=alpha,
        backend=backend,
    )


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-probability of the labelled tokens, ``[B]``:
    ``log pi(y_i | x_i) = sum_t log p(labels[i, t + 1])`` over non-ignored tokens."""
    check_logits(logits, labels)
    nll = unlearning_cross_entropy(
        logits, shift_labels(labels), mode="nll", ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.sum(dim=1)
