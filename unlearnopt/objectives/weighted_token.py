"""Token objectives that reweight or redirect each forget token.

Per token with (shifted) label y, logits z (one row of V), p = softmax(z) and p_y = p[y];
every weight and every target distribution is detached (no gradient flows through it):

- ``wga`` (weighted gradient ascent; Wang et al., 2025, "Rethinking LLM Unlearning
  Objectives: A Gradient Perspective and Go Beyond", ICLR 2025)::

      loss = w * log p_y,   w = p_y ** beta

  Tokens the model already finds unlikely get little weight, so ascent stops pushing them.
- ``satimp`` (saturation-importance reweighting; Yang et al., 2025, "Exploring Criteria of
  Loss Reweighting to Enhance LLM Unlearning", ICML 2025)::

      loss = w * log p_y,   w = p_y ** beta1 * (1 - p_y) ** beta2

- ``ce_u`` (Yang et al., 2025, "CE-U: Cross Entropy Unlearning", arXiv 2503.01224)::

      q = softmax(z with z_y = -inf)      (the label's mass spread over the other tokens)
      loss = -sum_v q_v log p_v          (cross-entropy of p against q)

  Its gradient in z is p - q: bounded, and zero only when p = q (p_y = 0).
- ``undial`` (Dong et al., 2024, "UNDIAL: Self-Distillation with Adjusted Logits for
  Robust Unlearning in Large Language Models", arXiv 2402.10052)::

      q = softmax(z_ref - gamma * e_y)    (the reference's logits, label logit lowered)
      loss = -sum_v q_v log p_v = KL(q || p) + H(q)

  H(q) does not depend on the trained model, so the gradient, p - q, is the forward KL's:
  it runs on the fused masked KL (``masked_kl`` with ``ref_labels``, ``ref_label_shift`` and
  ``cross_entropy=True``; the value reported is the cross-entropy, as in the paper).

All four are means over the labelled tokens (the labels are shifted inside, -100 =
ignored); 0 when no token counts. Math in float32 (float64 for float64 logits). ``wga``,
``satimp`` and ``ce_u`` are modes of the fused ``unlearnopt.ops.unlearning_cross_entropy``
(no softmax is materialised; their ``*_from_hidden`` forms in
``unlearnopt.objectives.fused_linear`` never build the logits).
"""

from __future__ import annotations

import torch

from unlearnopt.objectives.shift import IGNORE_INDEX, check_logits, shift_labels
from unlearnopt.ops._checks import check_exponent
from unlearnopt.ops.masked_kl import masked_kl
from unlearnopt.ops.unlearning_cross_entropy import unlearning_cross_entropy


def check_ce_u_vocab(vocab: int) -> None:
    if vocab < 2:
        raise ValueError(f"ce_u needs a vocabulary of at least 2, got V = {vocab}")


def _token_mode_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: str,
    beta1: float,
    beta2: float,
    backend: str | None,
) -> torch.Tensor:
    check_logits(logits, labels)
    return unlearning_cross_entropy(
        logits,
        shift_labels(labels),
        mode=mode,
        ignore_index=IGNORE_INDEX,
        reduction="mean",
        beta1=beta1,
        beta2=beta2,
        backend=backend,
    )


def wga_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean over labelled tokens of ``p_y**beta (detached) * log p_y``.

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` unshifted, -100 = ignored.
        beta: the weight's exponent, >= 0 (paper: 1; beta = 0 is plain GA).
        backend: the op's backend (default: ``UNLEARNOPT_BACKEND`` or automatic);
            ``"reference"`` is plain PyTorch.

    Plain PyTorch equivalent (``lp = logits[:, :-1].float().log_softmax(-1)``, ``y`` the
    shifted labels, ``m = y != -100``)::

        lp_y = lp[m].gather(-1, y[m, None])[:, 0]
        (lp_y.detach().exp() ** beta * lp_y).mean()
    """
    beta = check_exponent("beta", beta)
    return _token_mode_loss(logits, labels, "wga", beta, 1.0, backend)


def satimp_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta1: float = 5.0,
    beta2: float = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean over labelled tokens of ``p_y**beta1 * (1 - p_y)**beta2 (detached) * log p_y``.

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` unshifted, -100 = ignored.
        beta1, beta2: the exponents, >= 0 (paper / open-unlearning: 5 and 1).
        backend: as in :func:`wga_loss`.
    """
    beta1 = check_exponent("beta1", beta1)
    beta2 = check_exponent("beta2", beta2)
    return _token_mode_loss(logits, labels, "satimp", beta1, beta2, backend)


def ce_u_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Mean over labelled tokens of the cross-entropy of p against
    ``q = softmax(z with z_y = -inf)`` (q detached); per token ``-log(1 - p_y) + H(q)``.

    Args:
        logits: ``[B, T, V]`` with V >= 2; labels: ``[B, T]`` unshifted, -100 = ignored.
        backend: as in :func:`wga_loss`.
    """
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        check_ce_u_vocab(logits.shape[-1])
    return _token_mode_loss(logits, labels, "ce_u", 1.0, 1.0, backend)


def undial_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, gamma: float = 10.0
) -> torch.Tensor:
    """Mean over labelled tokens of the cross-entropy of p against
    ``q = softmax(z_ref - gamma * e_y)`` (fused masked KL plus the target's entropy).

    Args:
        logits: ``[B, T, V]`` the trained model's logits.
        ref_logits: ``[B, T, V]`` the reference's logits (detached inside).
        labels: ``[B, T]`` unshifted, -100 = ignored.
        gamma: how far the label logit is lowered, >= 0 (open-unlearning's default: 10).

    Returns:
        0-dim float32 (float64 for float64 logits, on the reference backend); 0 when no
        token is labelled.
    """
    gamma = check_exponent("gamma", gamma)
    check_logits(logits, labels)
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} must have the shape of logits "
            f"{tuple(logits.shape)}"
        )
    y = shift_labels(labels).reshape(-1)
    vocab = logits.shape[-1]
    return masked_kl(
        logits.reshape(-1, vocab),
        ref_logits.reshape(-1, vocab),
        token_mask=y != IGNORE_INDEX,
        reduction="mean",
        ref_labels=y,
        ref_label_shift=gamma,
        cross_entropy=True,
    )
