"""The losses of the methods, built from ``unlearnopt.ops``.

Every loss takes the model's logits ``[B, T, V]`` and the *unshifted* labels ``[B, T]``
(``-100`` = ignored) and aligns them for next-token prediction itself. Reductions: token
losses (also ``wga``, ``satimp``, ``ce_u``, ``undial``) and the KL are means over labelled
tokens; NPO, SimNPO and DPO are means over sequences (pairs).
"""

from unlearnopt.objectives.dpo import dpo_loss
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
    "dpo_loss",
    "kl_to_reference",
    "npo_loss",
    "satimp_loss",
    "sequence_log_prob",
    "shift_labels",
    "simnpo_loss",
    "token_loss",
    "undial_loss",
    "wga_loss",
]
