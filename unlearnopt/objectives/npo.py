"""Negative Preference Optimisation (Zhang et al., 2024, arXiv 2404.05868).

Per sequence i, with log pi = the sum of the labelled tokens' log-probabilities::

    npo_i = (2 / beta) * log(1 + (pi_theta(y_i|x_i) / pi_ref(y_i|x_i)) ** beta)
          = (2 / beta) * softplus(beta * (log pi_theta - log pi_ref))

mean over the sequences of the batch (a sequence without labelled tokens has log-ratio 0
and no gradient). The paper's beta = 0.1. Its gradient is GA's, per sequence, reweighted by
2 sigmoid(beta * log-ratio) <= 2 -> 0 as the forget sequence's probability falls, which is
what keeps NPO from collapsing as fast as GA.
"""

from __future__ import annotations

import torch

from unlearnopt.objectives.token import sequence_log_prob


def npo_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """Mean NPO loss over sequences.

    Args:
        logits: ``[B, T, V]`` the trained model's logits.
        ref_logits: ``[B, T, V]`` the reference model's logits (no gradient).
        labels: ``[B, T]`` unshifted labels (-100 = not part of the answer).
        beta: inverse temperature, > 0 (paper: 0.1).

    Returns:
        0-dim float32 (float64 for float64 logits).
    """
    if not isinstance(beta, (int, float)) or not float(beta) > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    log_ratio = sequence_log_prob(logits, labels) - sequence_log_prob(ref_logits.detach(), labels)
    return (2.0 / beta) * torch.nn.functional.softplus(beta * log_ratio).mean()
