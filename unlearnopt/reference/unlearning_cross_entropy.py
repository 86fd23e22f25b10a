"""Reference unlearning cross-entropy: plain PyTorch, autograd does the gradient.

Per token t with label y and p = softmax(z) (weights and targets detached: no gradient
flows through them):
    nll: -log p_y            ga: +log p_y            uce: -log(1 - alpha * p_y)
    wga: w log p_y, w = p_y ** beta1
    satimp: w log p_y, w = p_y ** beta1 * (1 - p_y) ** beta2
    ce_u: -sum_v q_v log p_v, q = softmax(z with z_y = -inf)
Ignored tokens (label == ignore_index) contribute 0 loss and exactly 0 gradient, whatever
their logits hold (NaN included); ``mean`` divides by the number of non-ignored tokens
(0 tokens -> loss 0, not NaN). A non-finite logit in a kept row makes that row's loss and
gradient non-finite. A label outside [0, V) that is not ignore_index (reachable only when
the eager label check is off, see ``unlearnopt.ops._checks``) gives a NaN loss and a NaN
gradient row: it is never read.

Accuracy near p_y = 1 (a confident model, the usual case on a forget set): every quantity
is written through the label's log-odds ``t = log p_y - log(1 - p_y)``, where
``log(1 - p_y) = logsumexp_{v != y} log p_v`` is summed over the other classes, so
``1 - p_y = sigmoid(-t)`` never comes from ``1 - p_y`` in floating point:
    nll = softplus(-t) = logaddexp(0, -t),  ga = -nll,
    uce = -log1p(-alpha sigmoid(t))          while alpha p_y < 1/2,
          -log((1 - alpha) + alpha sigmoid(-t))  above (a sum of non-negative terms).
The gradient autograd derives from these is ``c (p - e_y)`` with the label entry formed as
``-sigmoid(-t)`` times a factor, free of cancellation. The weights of wga and satimp are
``exp(beta1 log p_y + beta2 log(1 - p_y))`` with both logs from t (``0 ** 0 = 1``). ce_u is
written ``-log(1 - p_y) + H(r) = softplus(t) + H(r)``, H(r) the (detached) entropy of r:
the same value and gradient ``p - r = -exp(t) (p - e_y)``, formed without the cancellation
of ``p - r`` when p_y -> 0 (its second derivative is that of softplus(t), not of the
cross-entropy with r held fixed). ce_u needs another class with a finite logit (else r is
0/0: NaN).
"""

from __future__ import annotations

import torch

MODES = ("nll", "ga", "uce", "wga", "satimp", "ce_u")
REDUCTIONS = ("mean", "sum", "none")
# The label's own slot in the "other classes" logsumexp: log p_y - this, whose exp is 0 in
# every float format, keeps the logsumexp's gradient finite when every other logit is -inf.
_LABEL_SLOT_OFFSET = 1e4


def label_log_odds(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t [N], keep [N])``: ``t = log p_y - log(1 - p_y)`` per row of ``logits [N, V]``.

    Ignored rows see zero logits (so they get exactly zero gradient); rows whose label is
    out of range see NaN logits.
    """
    vocab = logits.shape[-1]
    keep = labels != ignore_index
    valid = (labels >= 0) & (labels < vocab)
    safe = torch.where(keep & valid, labels, torch.zeros_like(labels)).long()
    poison = torch.where(keep & ~valid, float("nan"), 0.0).to(logits.dtype)
    z = torch.where(keep[:, None], logits + poison[:, None], torch.zeros_like(logits))
    logp = torch.log_softmax(z, dim=-1)
    logp_y = logp.gather(-1, safe[:, None]).squeeze(-1)
    is_label = torch.arange(vocab, device=logits.device) == safe[:, None]
    others = torch.where(is_label, logp_y[:, None] - _LABEL_SLOT_OFFSET, logp)
    return logp_y - torch.logsumexp(others, dim=-1), keep


def _label_weight(t: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """Detached ``p_y ** beta1 * (1 - p_y) ** beta2`` from the log-odds t (``0 ** 0 = 1``)."""
    t = t.detach()
    log_w = torch.zeros_like(t)
    if beta1 != 0:
        log_w = log_w - beta1 * torch.logaddexp(torch.zeros_like(t), -t)  # beta1 log p_y
    if beta2 != 0:
        log_w = log_w - beta2 * torch.logaddexp(torch.zeros_like(t), t)  # beta2 log(1 - p_y)
    return log_w.exp()


def _label_removed_entropy(z: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor):
    """Detached entropy ``H(r)`` of ``r = softmax(z with z_y = -inf)`` per row ``[N]``.

    With x = z - max over the other classes and e = exp(x): H = log s - sum(e x) / s, two
    non-negative terms, s = top + rest split into the columns at the max (each exactly 1)
    and the others, so that log s = log top + log1p(rest / top) keeps its digits when one
    class dominates (a small entropy). NaN when no other class has a finite logit.
    """
    vocab = z.shape[-1]
    safe = torch.where(keep & (labels >= 0) & (labels < vocab), labels, 0).long()
    others = z.detach().scatter(-1, safe[:, None], float("-inf"))
    x = others - others.amax(dim=-1, keepdim=True)
    e = x.exp()
    at_max = x == 0
    top = at_max.sum(dim=-1).to(z.dtype)
    rest = torch.where(at_max, 0.0, e).sum(dim=-1)
    spread = -torch.where(e > 0, e * x, 0.0).sum(dim=-1)  # -sum e x >= 0; x = -inf adds 0
    return torch.log(top) + torch.log1p(rest / top) + spread / (top + rest)


def token_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: str,
    alpha: float,
    ignore_index: int,
    beta1: float = 1.0,
    beta2: float = 1.0,
) -> torch.Tensor:
    """Per-token loss ``[N]`` (0 at ignored tokens) from logits ``[N, V]``, labels ``[N]``.

    Math in float32 for 16-bit logits, float64 for float64 logits (the oracle of the tests
    and the double-backward path of OFMU).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    t, keep = label_log_odds(z, labels, ignore_index)
    if mode in ("nll", "ga"):
        nll = torch.logaddexp(torch.zeros_like(t), -t)
        loss = nll if mode == "nll" else -nll
    elif mode == "ce_u":
        # -sum_v r_v log p_v = -log(1 - p_y) + H(r) = softplus(t) + H(r), r detached.
        loss = torch.logaddexp(torch.zeros_like(t), t) + _label_removed_entropy(z, labels, keep)
    elif mode in ("wga", "satimp"):
        log_p_y = -torch.logaddexp(torch.zeros_like(t), -t)
        loss = _label_weight(t, beta1, beta2 if mode == "satimp" else 0.0) * log_p_y
    else:
        ap = alpha * torch.sigmoid(t)
        small = ap < 0.5
        # Both branches stay finite where they are not selected (their gradients would
        # otherwise turn 0 * inf into NaN).
        low = -torch.log1p(-torch.where(small, ap, torch.zeros_like(ap)))
        one_minus = (1 - alpha) + alpha * torch.sigmoid(-t)
        high = -torch.log(torch.where(small, torch.ones_like(one_minus), one_minus))
        loss = torch.where(small, low, high)
    return torch.where(keep, loss, torch.zeros_like(loss))


def reduce_tokens(loss: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / keep.sum().clamp(min=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def unlearning_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "nll",
    ignore_index: int = -100,
    reduction: str = "mean",
    alpha: float = 0.5,
    beta1: float = 1.0,
    beta2: float = 1.0,
) -> torch.Tensor:
    """logits ``[..., V]`` (any float dtype), labels ``[...]`` int64/int32 -> loss (float32,
    or float64 for float64 logits).

    ``reduction="none"`` returns the shape of ``labels``.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    loss = token_losses(flat_logits, flat_labels, mode, alpha, ignore_index, beta1, beta2)
    out = reduce_tokens(loss, flat_labels != ignore_index, reduction)
    return out.reshape(labels.shape) if reduction == "none" else out


def fused_linear_unlearning_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    mode: str = "nll",
    ignore_index: int = -100,
    reduction: str = "mean",
    alpha: float = 0.5,
    beta1: float = 1.0,
    beta2: float = 1.0,
) -> torch.Tensor:
    """hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]`` -> the loss of
    ``hidden @ weight.T + bias``."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return unlearning_cross_entropy(
        logits, labels, mode, ignore_index, reduction, alpha, beta1, beta2
    )


def fused_linear_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    sequence_loss,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """hidden ``[B, T, H]``, weight ``[V, H]``, labels ``[B, T]`` -> ``sum_b f_b(lp_b)`` with
    ``lp_b`` the summed log-probabilities of sequence b's kept tokens and the terms
    ``sequence_loss(lp, slice(0, B))`` (``[B]``). The full logits; differentiable twice."""
    nll = fused_linear_unlearning_cross_entropy(
        hidden, weight, labels, bias, "nll", ignore_index, "none"
    )
    log_prob = -nll.sum(dim=1)
    terms = sequence_loss(log_prob, slice(0, labels.shape[0]))
    if not isinstance(terms, torch.Tensor) or tuple(terms.shape) != tuple(log_prob.shape):
        raise ValueError(
            f"sequence_loss must return one term per sequence, shape {tuple(log_prob.shape)}"
        )
    return terms.sum()
