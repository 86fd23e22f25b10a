"""SimNPO: reference-free, length-normalised NPO (Fan et al., 2024, arXiv 2410.07163).

Per sequence i, with log pi = the sum of the labelled tokens' log-probabilities and |y_i|
the number of labelled (shifted) tokens::

    simnpo_i = -(2 / beta) * log sigmoid(-(beta / |y_i|) * log pi_theta(y_i|x_i) - gamma)
             = (2 / beta) * softplus((beta / |y_i|) * log pi_theta(y_i|x_i) + gamma)

mean over the sequences of the batch. Dividing by |y_i| replaces NPO's reference model: long
answers are not pushed harder than short ones. gamma is the reward margin (the paper finds
gamma = 0 best on TOFU). A sequence without labelled tokens counts as |y| = 1 with log pi = 0
(constant loss, no gradient).
"""

from __future__ import annotations

import torch

from unlearnopt.objectives.shift import IGNORE_INDEX, shift_labels
from unlearnopt.objectives.token import sequence_log_prob


def simnpo_loss(
    logits: torch.Tensor, labels: torch.Tensor, beta: float = 2.5, gamma: float = 0.0
) -> torch.Tensor:
    """Mean SimNPO loss over sequences.

    Args:
        logits: ``[B, T, V]`` the trained model's logits.
        labels: ``[B, T]`` unshifted labels (-100 = not part of the answer).
        beta: inverse temperature, > 0 (paper, TOFU forget05: 2.5).
        gamma: reward margin, >= 0 (paper: 0).

    Returns:
        0-dim float32 (float64 for float64 logits).
    """
    if not isinstance(beta, (int, float)) or not float(beta) > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if not isinstance(gamma, (int, float)) or not float(gamma) >= 0:
        raise ValueError(f"gamma must be a non-negative number, got {gamma!r}")
    log_pi = sequence_log_prob(logits, labels)  # [B]
    length = (shift_labels(labels) != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(log_pi.dtype)
    return (2.0 / beta) * torch.nn.functional.softplus(beta * log_pi / length + gamma).mean()
