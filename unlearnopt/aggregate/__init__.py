"""How per-objective gradients become one update: weightings, granularity, combination.

"Gram matrix -> weights" (:mod:`~unlearnopt.aggregate.weighting`) is kept apart from
"weights -> combined gradient" (:mod:`~unlearnopt.aggregate.combine`); the min-norm QP
solver is pluggable (``MinNormWeights(solver=...)``, default ``unlearnopt.ops.min_norm``).
"""

from unlearnopt.aggregate.aggregator import GRANULARITIES, Aggregator
from unlearnopt.aggregate.combine import combine_gradients
from unlearnopt.aggregate.weighting import (
    NORMALIZE,
    FixedWeights,
    MinNormWeights,
    Weighting,
    WeightingResult,
)

__all__ = [
    "GRANULARITIES",
    "NORMALIZE",
    "Aggregator",
    "FixedWeights",
    "MinNormWeights",
    "Weighting",
    "WeightingResult",
    "combine_gradients",
]
