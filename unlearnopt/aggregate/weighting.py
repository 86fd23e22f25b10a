"""Weightings: Gram matrices of K gradients -> the coefficients that combine them.

A weighting only sees Gram matrices ``[B, K, K]`` (B = 1 for one global problem, B = P for
one problem per parameter tensor) and returns, per problem, the weights it chose and the
coefficients to apply to the *original* gradients: ``d = sum_i coefficients[:, i] * g_i``.
The two differ when the weighting rescales the gradients first (min-norm with
``normalize="mean"``): then ``coefficients = weights * scales``. Combining the gradients is
a separate step (``unlearnopt.aggregate.combine``). Nothing here synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

NORMALIZE = ("mean", "unit", "none")


class WeightingResult(NamedTuple):
    """Per problem (B of them) and objective (K of them).

    Attributes:
        weights: ``[B, K]`` float32 (float64 for a float64 Gram), the weights chosen (on
            the simplex for min-norm).
        coefficients: ``[B, K]``, same dtype, what multiplies each ORIGINAL gradient.
        active: ``[B, K]`` bool, False where an objective sat out (weight 0).
    """

    weights: torch.Tensor
    coefficients: torch.Tensor
    active: torch.Tensor


def _check_gram(gram: torch.Tensor) -> None:
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() != 3 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be [B, K, K], got shape {tuple(gram.shape)}")


class Weighting:
    """Base class: ``weighting(gram [B, K, K]) -> WeightingResult``."""

    def __call__(self, gram: torch.Tensor) -> WeightingResult:
        raise NotImplementedError


class FixedWeights(Weighting):
    """A weighted sum with fixed weights ``lambda_i`` (GA, GradDiff, NPO, SIU):
    ``d = sum_i lambda_i g_i``. An objective with weight 0 counts as sitting out."""

    def __init__(self, weights: Sequence[float]):
        values = [float(w) for w in weights]
        if not values:
            raise ValueError("weights must hold at least one weight")
        if any(not torch.isfinite(torch.tensor(w)) for w in values):
            raise ValueError(f"weights must be finite, got {values}")
        self.weights = values

    def __call__(self, gram: torch.Tensor) -> WeightingResult:
        _check_gram(gram)
        b, k = gram.shape[0], gram.shape[-1]
        if k != len(self.weights):
            raise ValueError(
                f"FixedWeights has {len(self.weights)} weights but the Gram "
                f"matrix is for K={k} gradients"
            )
        dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
        w = torch.tensor(self.weights, dtype=dtype, device=gram.device).expand(b, k)
        return WeightingResult(w, w, w != 0)

    def __repr__(self) -> str:
        return f"FixedWeights({self.weights})"


def default_solver(gram: torch.Tensor) -> torch.Tensor:
    """``unlearnopt.ops.min_norm``: simplex weights ``[B, K]`` from Gram ``[B, K, K]``.

    Without its finiteness check (a host sync): the unlearner checks the Gram itself, once,
    together with the losses."""
    from unlearnopt.ops.min_norm import min_norm

    return min_norm(gram, check=False).weights


class MinNormWeights(Weighting):
    """MGDA: the min-norm point of the convex hull of the (rescaled) gradients.

    Per problem, with norms n_i = sqrt(G_ii):

    1. *Sit-out*: objective i is inactive when ``n_i < sit_out * max_j n_j`` (at the first
       unlearning step the KL-to-reference gradient is rounding noise; in the simplex the
       min-norm point would *be* that noise). Inactive objectives get weight 0.
    2. *Rescale* each active gradient by s_i: ``normalize="mean"`` to the mean norm of the
       active ones (s_i = mean / n_i), ``"unit"`` to norm 1 (s_i = 1 / n_i), ``"none"``
       (s_i = 1). A zero gradient keeps s_i = 1 (it is zero either way).
    3. ``w = solver(S G S)`` over the active objectives only, then
       ``d = sum_i w_i s_i g_i``, i.e. the min-norm point of the RESCALED gradients ĝ_i, so
       ``<d, ĝ_i> >= ||d||^2`` for every active i (and ``<d, g_i> = <d, ĝ_i> / s_i > 0``:
       still a common descent direction of the original objectives).

    Inactive objectives are removed from the QP without a host sync: their row and column
    of the Gram are zeroed and their diagonal set to a positive M (an orthogonal dummy
    vector). For any M > 0 the active part of that problem's solution is, up to its sum,
    the solution of the problem restricted to the active objectives (same KKT conditions),
    so the weights are renormalised over the active set afterwards.

    Args:
        normalize: ``"mean"`` (default; MOLLM's rescaling), ``"unit"`` or ``"none"``.
        sit_out: relative norm threshold (default 1e-3); 0 keeps every objective.
        solver: ``solver(gram [B, K, K]) -> weights [B, K]`` on the simplex; default
            ``unlearnopt.ops.min_norm``.
    """

    def __init__(
        self,
        normalize: str = "mean",
        sit_out: float = 1e-3,
        solver: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if not isinstance(sit_out, (int, float)) or not (0.0 <= float(sit_out) < 1.0):
            raise ValueError(f"sit_out must be a number in [0, 1), got {sit_out!r}")
        self.normalize = normalize
        self.sit_out = float(sit_out)
        self.solver = solver if solver is not None else default_solver

    def __call__(self, gram: torch.Tensor) -> WeightingResult:
        _check_gram(gram)
        g = gram if gram.dtype == torch.float64 else gram.float()
        norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0).sqrt()  # [B, K]
        largest = norms.amax(-1, keepdim=True)
        active = norms >= self.sit_out * largest  # all if max = 0
        nonzero = norms > 0
        safe = torch.where(nonzero, norms, torch.ones_like(norms))
        if self.normalize == "none":
            scales = torch.ones_like(norms)
        elif self.normalize == "unit":
            scales = torch.where(nonzero, 1.0 / safe, torch.ones_like(norms))
        else:
            act = active.to(norms.dtype)
            mean = (norms * act).sum(-1, keepdim=True) / act.sum(-1, keepdim=True).clamp(min=1)
            scales = torch.where(nonzero, mean / safe, torch.ones_like(norms))
        scaled = g * scales.unsqueeze(-1) * scales.unsqueeze(-2)
        both = active.unsqueeze(-1) & active.unsqueeze(-2)
        # The dummy's squared norm: the mean active diagonal (keeps the QP well scaled).
        diag = torch.diagonal(scaled, dim1=-2, dim2=-1)
        act = active.to(diag.dtype)
        dummy = (diag * act).sum(-1, keepdim=True) / act.sum(-1, keepdim=True).clamp(min=1)
        dummy = torch.where(dummy > 0, dummy, torch.ones_like(dummy))
        eye = torch.eye(g.shape[-1], dtype=torch.bool, device=g.device)
        masked = torch.where(both, scaled, torch.zeros_like(scaled))
        masked = torch.where(eye & ~active.unsqueeze(-1), dummy.unsqueeze(-1), masked)
        w = self.solver(masked).to(g.dtype)
        w = torch.where(active, w, torch.zeros_like(w))
        w = w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
        return WeightingResult(w, w * scales, active)

    def __repr__(self) -> str:
        return f"MinNormWeights(normalize={self.normalize!r}, sit_out={self.sit_out})"
