"""``simnpo``: Simple NPO (Fan, Liu, Lin, Jia, Zhang, Mei, Liu, 2024, "Simplicity Prevails:
Rethinking Negative Preference Optimization for LLM Unlearning", arXiv 2410.07163).

Objectives: ``forget_simnpo`` = mean over forget *sequences* of
``-(2/beta) log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma)`` (log pi the sum of the
answer tokens' log-probabilities, |y| their number; no reference model); and, when
``retain_weight > 0``, ``retain_nll`` (mean -log p(y) over retain label tokens). Weighted sum
``d = g_simnpo + retain_weight * g_retain_nll``.

Defaults: beta = 2.5, gamma = 0 (the paper's TOFU forget05 setting); ``retain_weight = 0``
(plain SimNPO, no retain batch). The paper's TOFU runs weigh the forget loss 0.1375 and the
retain NLL 1, i.e. ``retain_weight = 1 / 0.1375 ≈ 7.3`` here up to the learning rate.
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
from unlearnopt.objectives import simnpo_loss_of


class SimNPO(Method):
    """SimNPO on forget (beta = 2.5, gamma = 0) + optional ``retain_weight`` x NLL on retain."""

    name = "simnpo"
    defaults: ClassVar[Mapping[str, Any]] = {"beta": 2.5, "gamma": 0.0, "retain_weight": 0.0}

    def validate_config(self) -> None:
        check_positive("beta", self.config["beta"])
        check_weight("gamma", self.config["gamma"])
        check_weight("retain_weight", self.config["retain_weight"])

    def objectives(self) -> list[Objective]:
        beta, gamma = float(self.config["beta"]), float(self.config["gamma"])
        forget = Objective(
            "forget_simnpo",
            "forget",
            lambda ctx: simnpo_loss_of(ctx, beta, gamma),
            unit="sequence",
        )
        return with_retain_nll(forget, self.config["retain_weight"])

    def aggregator(self) -> Aggregator:
        return forget_retain_aggregator(1.0, self.config["retain_weight"])


register_method("simnpo", SimNPO)
