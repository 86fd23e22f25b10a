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

from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.contract import Objective
from unlearnopt.methods.base import Method
from unlearnopt.methods.grad_diff import check_weight, retain_nll_objective
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import simnpo_loss


class SimNPO(Method):
    """SimNPO on forget (beta = 2.5, gamma = 0) + optional ``retain_weight`` x NLL on retain."""

    name = "simnpo"
    defaults: ClassVar[Mapping[str, Any]] = {"beta": 2.5, "gamma": 0.0, "retain_weight": 0.0}

    def validate_config(self) -> None:
        beta, gamma = self.config["beta"], self.config["gamma"]
        if not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta must be a positive number, got {beta!r}")
        if not isinstance(gamma, (int, float)) or not gamma >= 0:
            raise ValueError(f"gamma must be a non-negative number, got {gamma!r}")
        check_weight("retain_weight", self.config["retain_weight"])

    def objectives(self) -> list[Objective]:
        beta, gamma = float(self.config["beta"]), float(self.config["gamma"])
        objs = [
            Objective(
                "forget_simnpo",
                "forget",
                lambda ctx: simnpo_loss(ctx.logits, ctx.labels, beta, gamma),
                unit="sequence",
            )
        ]
        if self.config["retain_weight"] > 0:
            objs.append(retain_nll_objective())
        return objs

    def aggregator(self) -> Aggregator:
        weights = [1.0]
        if self.config["retain_weight"] > 0:
            weights.append(float(self.config["retain_weight"]))
        return Aggregator(FixedWeights(weights))


register_method("simnpo", SimNPO)
