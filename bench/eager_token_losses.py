"""The unlearning cross-entropy modes as a user writes them in plain PyTorch (the eager
baselines of the cross-entropy benchmarks), with the parameters our op runs them with.

Per token with label y and p = softmax(logits): nll -log p_y, ga +log p_y, uce
-log(1 - p_y / 2), wga p_y log p_y (weight detached), satimp p_y^5 (1 - p_y) log p_y
(weight detached), ce_u the cross-entropy against softmax(logits with the label's at -inf);
means over the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The op's keyword arguments that match these formulas (the papers' defaults).
MODE_KWARGS = {"uce": dict(alpha=0.5), "wga": dict(beta1=1.0), "satimp": dict(beta1=5.0, beta2=1.0)}


def eager_token_loss(logits: torch.Tensor, labels: torch.Tensor, mode: str) -> torch.Tensor:
    """``logits [N, V]`` (any float dtype, float32 math), ``labels [N]`` -> the mean loss."""
    logits = logits.float()
    if mode == "nll":
        return F.cross_entropy(logits, labels)
    if mode == "ce_u":
        target = logits.detach().scatter(-1, labels[:, None], float("-inf")).softmax(-1)
        return -(target * logits.log_softmax(-1)).sum(-1).mean()
    logp_y = -F.cross_entropy(logits, labels, reduction="none")
    if mode == "ga":
        return logp_y.mean()
    if mode == "uce":
        return -torch.log1p(-0.5 * logp_y.exp()).mean()
    p_y = logp_y.detach().exp()
    weight = p_y if mode == "wga" else p_y**5 * (1 - p_y)
    return (weight * logp_y).mean()
