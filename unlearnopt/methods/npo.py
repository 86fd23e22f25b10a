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

from unlearnopt.aggregate import Aggregator
from unlearnopt.contract import Objective
from unlearnopt.methods.base import Method
from unlearnopt.methods.grad_diff import (
    check_positive,
    check_weight,
    forget_retain_aggregator,
    with_retain_nll,
)
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import npo_loss_of


class NPO(Method):
    """NPO on forget (beta = 0.1) + optional ``retain_weight`` x NLL on retain."""

    name = "npo"
    defaults: ClassVar[Mapping[str, Any]] = {"beta": 0.1, "retain_weight": 0.0}
    needs_ref = True

    def validate_config(self) -> None:
        check_positive("beta", self.config["beta"])
        check_weight("retain_weight", self.config["retain_weight"])

    def objectives(self) -> list[Objective]:
        beta = float(self.config["beta"])
        forget = Objective(
            "forget_npo", "forget", lambda ctx: npo_loss_of(ctx, beta), unit="sequence"
        )
        return with_retain_nll(forget, self.config["retain_weight"])

    def aggregator(self) -> Aggregator:
        return forget_retain_aggregator(1.0, self.config["retain_weight"])


register_method("npo", NPO)
