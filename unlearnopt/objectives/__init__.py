"""The losses of the methods, built from ``unlearnopt.ops``.

Every loss takes the model's logits ``[B, T, V]`` and the *unshifted* labels ``[B, T]``
(``-100`` = ignored) and aligns them for next-token prediction itself. Reductions: token
losses (also ``wga``, ``satimp``, ``ce_u``, ``undial``) and the KL are means over labelled
tokens; NPO, SimNPO and DPO are means over sequences (pairs).

``*_from_hidden`` (``unlearnopt.objectives.fused_linear``): the same losses from the output
head's inputs (``unlearnopt.output_head.HeadInputs``) through the fused-linear ops, without
``[B, T, V]`` logits. ``*_of(ctx, ...)`` (``unlearnopt.objectives.from_context``): the loss of
an objective context on whichever of the two paths it offers.
"""

from unlearnopt.objectives.dpo import dpo_loss
from unlearnopt.objectives.from_context import (
    ce_u_loss_of,
    dpo_loss_of,
    kl_to_reference_of,
    masked_kl_of,
    npo_loss_of,
    reference_sequence_log_prob,
    satimp_loss_of,
    sequence_log_prob_of,
    simnpo_loss_of,
    token_loss_of,
    undial_loss_of,
    vocab_size_of,
    wga_loss_of,
)
from unlearnopt.objectives.fused_linear import (
    ce_u_loss_from_hidden,
    kl_to_reference_from_hidden,
    masked_kl_from_hidden,
    npo_loss_from_hidden,
    npo_loss_from_log_probs,
    satimp_loss_from_hidden,
    sequence_log_prob_from_hidden,
    simnpo_loss_from_hidden,
    token_loss_from_hidden,
    undial_loss_from_hidden,
    wga_loss_from_hidden,
)
from unlearnopt.objectives.kl import kl_to_reference
from unlearnopt.objectives.npo import npo_loss
from unlearnopt.objectives.shift import IGNORE_INDEX, shift_labels
from unlearnopt.objectives.simnpo import simnpo_loss
from unlearnopt.objectives.token import TOKEN_MODES, sequence_log_prob, token_loss
from unlearnopt.objectives.weighted_token import ce_u_loss, satimp_loss, undial_loss, wga_loss

__all__ = [
    "IGNORE_INDEX",
    "TOKEN_MODES",
    "ce_u_loss",
    "ce_u_loss_from_hidden",
    "ce_u_loss_of",
    "dpo_loss",
    "dpo_loss_of",
    "kl_to_reference",
    "kl_to_reference_from_hidden",
    "kl_to_reference_of",
    "masked_kl_from_hidden",
    "masked_kl_of",
    "npo_loss",
    "npo_loss_from_hidden",
    "npo_loss_from_log_probs",
    "npo_loss_of",
    "reference_sequence_log_prob",
    "satimp_loss",
    "satimp_loss_from_hidden",
    "satimp_loss_of",
    "sequence_log_prob",
    "sequence_log_prob_from_hidden",
    "sequence_log_prob_of",
    "shift_labels",
    "simnpo_loss",
    "simnpo_loss_from_hidden",
    "simnpo_loss_of",
    "token_loss",
    "token_loss_from_hidden",
    "token_loss_of",
    "undial_loss",
    "undial_loss_from_hidden",
    "undial_loss_of",
    "vocab_size_of",
    "wga_loss",
    "wga_loss_from_hidden",
    "wga_loss_of",
]
