"""Reference unlearning cross-entropy: plain PyTorch, autograd does the gradient.

Per token t with label y (METHODS.md):
    nll: -log p(y)            ga: +log p(y)            uce: -log(1 - alpha * p(y))
Ignored tokens (label == ignore_index) contribute 0; ``mean`` divides by the number of
non-ignored tokens (0 tokens -> loss 0, not NaN).
"""

from __future__ import annotations

import torch

MODES = ("nll", "ga", "uce")
REDUCTIONS = ("mean", "sum", "none")


def token_losses(logits: torch.Tensor, labels: torch.Tensor, mode: str, alpha: float,
                 ignore_index: int) -> torch.Tensor:
    """Per-token loss ``[N]`` (0 at ignored tokens) from logits ``[N, V]``, labels ``[N]``.

    Math in float32 for 16-bit logits, float64 for float64 logits (the oracle of the tests
    and the double-backward path of OFMU).
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logp_y = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if mode == "nll":
        loss = -logp_y
    elif mode == "ga":
        loss = logp_y
    elif mode == "uce":
        loss = -torch.log1p(-alpha * logp_y.exp())
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return torch.where(keep, loss, torch.zeros_like(loss))


def reduce_tokens(loss: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / keep.sum().clamp(min=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def unlearning_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mode: str = "nll",
                             ignore_index: int = -100, reduction: str = "mean",
                             alpha: float = 0.5) -> torch.Tensor:
    """logits ``[..., V]`` (any float dtype), labels ``[...]`` int64 -> loss (float32, or
    float64 for float64 logits).

    ``reduction="none"`` returns the shape of ``labels``.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    loss = token_losses(flat_logits, flat_labels, mode, alpha, ignore_index)
    out = reduce_tokens(loss, flat_labels != ignore_index, reduction)
    return out.reshape(labels.shape) if reduction == "none" else out


def fused_linear_unlearning_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                          labels: torch.Tensor, bias: torch.Tensor | None = None,
                                          mode: str = "nll", ignore_index: int = -100,
                                          reduction: str = "mean",
                                          alpha: float = 0.5) -> torch.Tensor:
    """hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]`` -> the loss of ``hidden @ weight.T + bias``."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return unlearning_cross_entropy(logits, labels, mode, ignore_index, reduction, alpha)
