"""``ga``: gradient ascent on the forget set (the baseline of every unlearning paper).

Objective: ``forget_ga`` = mean over forget label tokens of +log p(y);
minimising it ascends the forget negative log-likelihood. Unbounded below: its gradient
does not vanish as p(y) -> 0, so GA collapses the model if run long (compare methods at
matched forget efficacy; early-stopped GA is the baseline to beat). Single objective,
weight 1. No options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.contract import Objective
from unlearnopt.methods.base import Method
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import token_loss_of


def forget_ga_objective() -> Objective:
    return Objective("forget_ga", "forget", lambda ctx: token_loss_of(ctx, "ga"))


class GA(Method):
    """Gradient ascent: ``d = grad(+log p(y))`` on the forget batch."""

    name = "ga"
    defaults: ClassVar[Mapping[str, Any]] = {}

    def objectives(self) -> list[Objective]:
        return [forget_ga_objective()]

    def aggregator(self) -> Aggregator:
        return Aggregator(FixedWeights([1.0]))


register_method("ga", GA)
