"""How per-objective gradients become one update: weightings, granularity, combination.

"Gram matrix -> weights" (:mod:`~unlearnopt.aggregate.weighting`) is kept apart from
"weights -> combined gradient" (:mod:`~unlearnopt.aggregate.combine`); the min-norm QP
solver is pluggable (``MinNormWeights(solver=...)``, default ``unlearnopt.ops.min_norm``).
Update masks (:mod:`~unlearnopt.aggregate.masks`) wrap any aggregator.
"""

from unlearnopt.aggregate.aggregator import GRANULARITIES, Aggregator
from unlearnopt.aggregate.combine import combine_gradients
from unlearnopt.aggregate.masks import (
    CosineMask,
    ElementMask,
    MaskedAggregator,
    SaliencyMask,
    TensorMask,
)
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
    "CosineMask",
    "ElementMask",
    "FixedWeights",
    "MaskedAggregator",
    "MinNormWeights",
    "SaliencyMask",
    "TensorMask",
    "Weighting",
    "WeightingResult",
    "combine_gradients",
]
