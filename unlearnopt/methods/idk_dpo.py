"""``idk_dpo``: DPO towards "I don't know" (Maini et al., 2024, "TOFU: A Task of Fictitious
Unlearning for LLMs", arXiv 2401.06121; the preference loss of Rafailov et al., 2023).

Objectives: ``forget_idk_dpo`` = mean over forget pairs of
``-(2/beta) log sigmoid(beta [(log pi_theta(w|x) - log pi_ref(w|x)) - (log pi_theta(l|x) -
log pi_ref(l|x))])`` with l the forget answer (dispreferred), w an "I don't know"-style answer
to the same prompt (preferred), log pi summed over the answer tokens; and, when
``retain_weight > 0``, ``retain_nll`` (mean -log p(y) over retain label tokens). Weighted sum
``d = forget_weight * g_dpo + retain_weight * g_retain_nll``. Needs a reference.

The preferred sequences travel in the forget batch as the auxiliary batch ``idk``
(``aux_idk_input_ids``, ``aux_idk_attention_mask``, ``aux_idk_labels``, row i pairing with
forget row i; build it with ``unlearnopt.contract.attach_aux(forget, "idk", idk_batch)``).
On prompt -> answer facts, :meth:`IdkDPO.fact_batches` builds it itself: each fact's answer is
replaced by one of the shipped completions (``unlearnopt.data.idk_answers()``), chosen by a
hash of the fact's id and ``seed`` (the same fact always gets the same alternate).

Defaults: beta = 0.1, forget_weight = 1, retain_weight = 1 (TOFU's IdkDPO and
open-unlearning's).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from unlearnopt.aggregate import Aggregator
from unlearnopt.contract import Objective, ObjectiveContext, attach_aux
from unlearnopt.methods.base import Method
from unlearnopt.methods.grad_diff import (
    check_positive,
    check_weight,
    forget_retain_aggregator,
    with_retain_nll,
)
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import dpo_loss_of


def idk_answer_for(fact_id: str, answers: Sequence[str], seed: int = 0) -> str:
    """The alternate answer of one fact: ``answers[crc32(f"{seed}:{fact_id}") % len]``."""
    return answers[zlib.crc32(f"{seed}:{fact_id}".encode()) % len(answers)]


class IdkDPO(Method):
    """DPO preferring an "I don't know" answer over the forget answer + retain NLL."""

    name = "idk_dpo"
    defaults: ClassVar[Mapping[str, Any]] = {
        "beta": 0.1,
        "forget_weight": 1.0,
        "retain_weight": 1.0,
        "seed": 0,
    }
    needs_ref = True

    def validate_config(self) -> None:
        check_positive("beta", self.config["beta"])
        check_weight("forget_weight", self.config["forget_weight"])
        check_weight("retain_weight", self.config["retain_weight"])
        if not isinstance(self.config["seed"], int):
            raise TypeError(f"seed must be an int, got {self.config['seed']!r}")

    def _dpo(self, ctx: ObjectiveContext) -> torch.Tensor:
        return dpo_loss_of(ctx.aux("idk"), ctx, float(self.config["beta"]))

    def objectives(self) -> list[Objective]:
        forget = Objective("forget_idk_dpo", "forget", self._dpo, unit="sequence")
        return with_retain_nll(forget, self.config["retain_weight"])

    def aggregator(self) -> Aggregator:
        return forget_retain_aggregator(self.config["forget_weight"], self.config["retain_weight"])

    def fact_batches(
        self,
        forget: Sequence[Any],
        retain: Sequence[Any],
        *,
        encode: Callable[[Sequence[str], Sequence[str]], dict[str, torch.Tensor]],
        tokenizer: Any,
        vocab_size: int,
    ) -> tuple[dict, dict | None]:
        """The forget batch with its ``idk`` alternates attached, and the retain batch."""
        from unlearnopt.data import idk_answers

        fb, rb = super().fact_batches(
            forget, retain, encode=encode, tokenizer=tokenizer, vocab_size=vocab_size
        )
        answers = idk_answers()
        seed = int(self.config["seed"])
        idk = encode(
            [f.prompt for f in forget], [idk_answer_for(str(f.id), answers, seed) for f in forget]
        )
        return attach_aux(fb, "idk", idk), rb


register_method("idk_dpo", IdkDPO)
