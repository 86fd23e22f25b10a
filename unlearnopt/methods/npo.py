"""``npo``: Negative Preference Optimisation (Zhang, Lin, Bai, Mei, 2024, arXiv 2404.05868).

Objectives: ``forget_npo`` = mean over forget *sequences* of
``(2/beta) log(1 + (pi_theta / pi_ref)^beta)`` with log pi the sum of the sequence's label
tokens' log-probabilities (beta = 0.1, the paper's value); and, when
``retain_weight > 0``, ``retain_nll`` (mean -log p(y) over retain label tokens; the paper's
"NPO+RT" variant, weight 1). Weighted sum ``d = g_npo + retain_weight * g_retain_nll``.
Default ``retain_weight = 0`` (plain NPO: no retain batch needed). Needs a reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.contract import Objective
from unlearnopt.methods.base import Method
from unlearnopt.methods.grad_diff import check_weight, retain_nll_objective
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import npo_loss_of


class NPO(Method):
    """NPO on forget (beta = 0.1) + optional ``retain_weight`` x NLL on retain."""

    name = "npo"
    defaults: ClassVar[Mapping[str, Any]] = {"beta": 0.1, "retain_weight": 0.0}
    needs_ref = True

    def validate_config(self) -> None:
        beta = self.config["beta"]
        if not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta must be a positive number, got {beta!r}")
        check_weight("retain_weight", self.config["retain_weight"])

    def objectives(self) -> list[Objective]:
        beta = float(self.config["beta"])
        objs = [
            Objective("forget_npo", "forget", lambda ctx: npo_loss_of(ctx, beta), unit="sequence")
        ]
        if self.config["retain_weight"] > 0:
            objs.append(retain_nll_objective())
        return objs

    def aggregator(self) -> Aggregator:
        weights = [1.0]
        if self.config["retain_weight"] > 0:
            weights.append(float(self.config["retain_weight"]))
        return Aggregator(FixedWeights(weights))


register_method("npo", NPO)
