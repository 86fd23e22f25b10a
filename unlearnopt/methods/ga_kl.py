"""``ga_kl``: GA on forget plus KL to the original model on retain.

Objectives: ``forget_ga`` (mean +log p(y) over forget label tokens) and ``retain_kl``
(mean over retain label tokens of KL(p_ref || p_theta), the forward KL to the frozen
reference, ``sum_v p_ref(v) [log p_ref(v) - log p_theta(v)]`` per token).
Weighted sum ``d = g_forget_ga + kl_weight * g_retain_kl``,
``kl_weight`` = 1 (TOFU's KL baseline, Maini et al., 2024). Needs a reference model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.contract import Objective
from unlearnopt.methods.base import Method
from unlearnopt.methods.ga import forget_ga_objective
from unlearnopt.methods.grad_diff import check_weight
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import kl_to_reference_of


def retain_kl_objective() -> Objective:
    return Objective("retain_kl", "retain", kl_to_reference_of)


class GAKL(Method):
    """GA on forget + ``kl_weight`` x KL(ref || model) on retain (default 1)."""

    name = "ga_kl"
    defaults: ClassVar[Mapping[str, Any]] = {"kl_weight": 1.0}
    needs_ref = True

    def validate_config(self) -> None:
        check_weight("kl_weight", self.config["kl_weight"])

    def objectives(self) -> list[Objective]:
        return [forget_ga_objective(), retain_kl_objective()]

    def aggregator(self) -> Aggregator:
        return Aggregator(FixedWeights([1.0, float(self.config["kl_weight"])]))


register_method("ga_kl", GAKL)
