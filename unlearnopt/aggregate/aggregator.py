"""An aggregator = a weighting (Gram -> coefficients) + a granularity + the combination."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unlearnopt.aggregate.combine import combine_gradients
from unlearnopt.aggregate.weighting import Weighting, WeightingResult

GRANULARITIES = ("global", "per_tensor")


class Aggregator:
    """Turns K per-objective gradients into one update direction.

    Args:
        weighting: a :class:`~unlearnopt.aggregate.weighting.Weighting` (``FixedWeights``,
            ``MinNormWeights`` or your own).
        granularity: ``"global"``: one problem on the total Gram ``[K, K]`` (the gradients
            as one long vector each); ``"per_tensor"``: one problem per parameter tensor on
            ``per_tensor[p]``, solved as one batch of P problems.
    """

    def __init__(self, weighting: Weighting, granularity: str = "global"):
        if not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a Weighting, got {type(weighting).__name__}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.weighting = weighting
        self.granularity = granularity

    def coefficients(self, per_tensor: torch.Tensor, total: torch.Tensor) -> WeightingResult:
        """Gram ``per_tensor [P, K, K]`` and ``total [K, K]`` -> result with B = 1 or P."""
        gram = total.unsqueeze(0) if self.granularity == "global" else per_tensor
        return self.weighting(gram)

    def combine(
        self,
        grads: Sequence[Sequence[torch.Tensor | None]],
        coefficients: torch.Tensor,
        *,
        inplace: bool = False,
    ) -> list[torch.Tensor | None]:
        return combine_gradients(grads, coefficients, inplace=inplace)

    @staticmethod
    def direction_sq_norm(per_tensor: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``||d||^2`` from the Gram (no pass over the gradients), 0-dim:
        ``sum_p c_p^T G_p c_p`` (``c`` is ``[1, K]`` or ``[P, K]``)."""
        c = coefficients.to(per_tensor.dtype).expand(per_tensor.shape[0], -1)
        return torch.einsum("pi,pij,pj->", c, per_tensor, c)

    def __repr__(self) -> str:
        return f"Aggregator({self.weighting!r}, granularity={self.granularity!r})"
