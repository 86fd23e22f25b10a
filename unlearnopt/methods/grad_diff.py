"""``grad_diff``: gradient difference, GA on forget plus NLL on retain.

Objectives: ``forget_ga`` (mean +log p(y) over forget label tokens) and ``retain_nll``
(mean -log p(y) over retain label tokens). Combined as a weighted sum
``d = g_forget_ga + retain_weight * g_retain_nll``; ``retain_weight`` = 1 as in the TOFU
benchmark's GradDiff (Maini et al., 2024).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.contract import Objective
from unlearnopt.methods.base import Method
from unlearnopt.methods.ga import forget_ga_objective
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import token_loss_of


def retain_nll_objective() -> Objective:
    return Objective("retain_nll", "retain", lambda ctx: token_loss_of(ctx, "nll"))


def check_weight(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def with_retain_nll(forget: Objective, retain_weight: float) -> list[Objective]:
    """``[forget]``, plus the retain NLL objective when ``retain_weight > 0``."""
    return [forget, retain_nll_objective()] if retain_weight > 0 else [forget]


def forget_retain_aggregator(forget_weight: float, retain_weight: float) -> Aggregator:
    """The weighted sum ``forget_weight * g_forget + retain_weight * g_retain_nll`` of the
    objectives :func:`with_retain_nll` returns (no retain term when ``retain_weight`` is 0)."""
    weights = [float(forget_weight)]
    if retain_weight > 0:
        weights.append(float(retain_weight))
    return Aggregator(FixedWeights(weights))


class GradDiff(Method):
    """GA on forget + ``retain_weight`` x NLL on retain (default 1)."""

    name = "grad_diff"
    defaults: ClassVar[Mapping[str, Any]] = {"retain_weight": 1.0}

    def validate_config(self) -> None:
        check_weight("retain_weight", self.config["retain_weight"])

    def objectives(self) -> list[Objective]:
        return [forget_ga_objective(), retain_nll_objective()]

    def aggregator(self) -> Aggregator:
        return Aggregator(FixedWeights([1.0, float(self.config["retain_weight"])]))


register_method("grad_diff", GradDiff)
