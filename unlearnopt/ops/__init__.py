"""Public low-level ops. Each picks a backend per call (see ``unlearnopt.ops._backend``)."""

from unlearnopt.ops.fused_linear_masked_kl import fused_linear_masked_kl
from unlearnopt.ops.fused_linear_sequence_loss import fused_linear_sequence_loss
from unlearnopt.ops.fused_linear_unlearning_cross_entropy import (
    fused_linear_unlearning_cross_entropy,
)
from unlearnopt.ops.grad_gram import GradGram, grad_cosine, grad_gram, gram_to_cosine
from unlearnopt.ops.masked_kl import (
    masked_kl,
    token_mask_from_labels,
    vocab_mask_from_token_ids,
)
from unlearnopt.ops.min_norm import MinNorm, kkt_residual, min_norm
from unlearnopt.ops.unlearning_cross_entropy import unlearning_cross_entropy

__all__ = [
    "GradGram",
    "MinNorm",
    "fused_linear_masked_kl",
    "fused_linear_sequence_loss",
    "fused_linear_unlearning_cross_entropy",
    "grad_cosine",
    "grad_gram",
    "gram_to_cosine",
    "kkt_residual",
    "masked_kl",
    "min_norm",
    "token_mask_from_labels",
    "unlearning_cross_entropy",
    "vocab_mask_from_token_ids",
]
