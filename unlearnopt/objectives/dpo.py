"""DPO on (preferred, dispreferred) answer pairs (Rafailov et al., 2023, arXiv 2305.18290),
scaled as in the NPO paper's unlearning baselines.

Per pair i, with log pi the sum of the answer tokens' log-probabilities, w the preferred and
l the dispreferred answer to the same prompt::

    r_i = (log pi_theta(w_i) - log pi_ref(w_i)) - (log pi_theta(l_i) - log pi_ref(l_i))
    dpo_i = -(2 / beta) * log sigmoid(beta * r_i) = (2 / beta) * softplus(-beta * r_i)

mean over pairs. The factor 2/beta (instead of DPO's 1) matches NPO's scaling, so the two
losses' gradients are comparable (the convention of the NPO paper and open-unlearning).
"""

from __future__ import annotations

import torch

from unlearnopt.objectives.token import sequence_log_prob


def dpo_loss(
    logits_w: torch.Tensor,
    ref_logits_w: torch.Tensor,
    labels_w: torch.Tensor,
    logits_l: torch.Tensor,
    ref_logits_l: torch.Tensor,
    labels_l: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Mean scaled DPO loss over B pairs.

    Args:
        logits_w, ref_logits_w: ``[B, Tw, V]`` the trained model's and the reference's logits
            on the preferred sequences; labels_w ``[B, Tw]`` unshifted (-100 = not answer).
        logits_l, ref_logits_l, labels_l: the same for the dispreferred sequences
            (``[B, Tl, V]``, ``[B, Tl]``; Tl may differ from Tw).
        beta: inverse temperature, > 0 (0.1 in the TOFU/NPO papers).

    Returns:
        0-dim float32 (float64 for float64 logits).
    """
    if not isinstance(beta, (int, float)) or not float(beta) > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if labels_w.shape[0] != labels_l.shape[0]:
        raise ValueError(
            f"labels_w has {labels_w.shape[0]} sequences and labels_l "
            f"{labels_l.shape[0]}; DPO needs one preferred per dispreferred"
        )
    win = sequence_log_prob(logits_w, labels_w) - sequence_log_prob(ref_logits_w.detach(), labels_w)
    lose = sequence_log_prob(logits_l, labels_l) - sequence_log_prob(
        ref_logits_l.detach(), labels_l
    )
    return (2.0 / beta) * torch.nn.functional.softplus(-beta * (win - lose)).mean()
