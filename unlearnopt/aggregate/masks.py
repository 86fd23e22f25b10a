"""Update masks: keep an aggregated update where the forget gradient is specific.

A mask restricts the contribution of some objectives (the *targets*, by default objective 0,
the forget objective) to part of the parameters; the other objectives (the retain repair)
still update every parameter. Two kinds, composable with any
:class:`~unlearnopt.aggregate.Aggregator` through :class:`MaskedAggregator`:

- *tensor masks* read only the per-tensor Gram ``G[p] = [<g_i[p], g_j[p]>]`` ``[P, K, K]``
  (no extra pass over the gradients) and scale each tensor's target coefficients:
  :class:`CosineMask`;
- *element masks* read the gradients once and zero the targets' gradients outside a
  selected set of entries (or rows): :class:`SaliencyMask`.

With the targets' coefficients ``c[p, t]`` from the wrapped aggregator, a tensor scale
``s_p`` and an element mask ``m[p]`` (0/1, same shape as the tensor), the direction is::

    d[p] = sum_{t in targets} s_p c[p, t] (m[p] * g_t[p]) + sum_{i not in targets} c[p, i] g_i[p]

Using a mask with any method (the method's own aggregator, wrapped)::

    method = make_method("mollm")                  # unlearnopt.methods.base.make_method
    inner = method.aggregator
    method.aggregator = lambda: MaskedAggregator(inner(), SaliencyMask(fraction=0.05))
    MultiObjectiveUnlearner(model, opt, method=method, ref_model=ref)

The coefficients are chosen by the wrapped weighting from the unmasked Gram (for min-norm
weightings the masked direction is then no longer exactly the min-norm point), and
:meth:`MaskedAggregator.direction_sq_norm` (a statistic) ignores element masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from unlearnopt.aggregate.aggregator import Aggregator
from unlearnopt.aggregate.weighting import WeightingResult

SALIENCY_SCORES = ("forget", "ratio")
SALIENCY_UNITS = ("element", "row")


def _check_index(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (an objective's index), got {value!r}")
    return value


def _check_indices(name: str, values) -> tuple[int, ...]:
    if isinstance(values, int):
        values = (values,)
    if not isinstance(values, Sequence) or not values:
        raise ValueError(
            f"{name} must be a non-empty sequence of objective indices, got {values!r}"
        )
    return tuple(_check_index(name, v) for v in values)


def _check_k(what: str, indices: Sequence[int], k: int) -> None:
    bad = [i for i in indices if i >= k]
    if bad:
        raise ValueError(f"{what} names objective(s) {bad} but there are only K={k}")


class TensorMask:
    """Base class: ``mask.tensor_scale(per_tensor [P, K, K]) -> [P]`` float scales."""

    def tensor_scale(self, per_tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ElementMask:
    """Base class: ``mask.element_masks(grads) -> P tensors`` (0/1 in the gradient's dtype,
    or ``None`` = keep the whole tensor)."""

    def element_masks(
        self, grads: Sequence[Sequence[torch.Tensor | None]]
    ) -> list[torch.Tensor | None]:
        raise NotImplementedError


class CosineMask(TensorMask):
    """Update (with the target objectives) only the tensors where the forget gradient
    conflicts little with the retain gradient.

    Per tensor p, with ``f`` = ``forget`` and ``R`` = ``retain`` (the retain gradient is
    ``g_R = sum_{r in R} g_r``)::

        cos_p = sum_{r in R} G[p, f, r] / sqrt(G[p, f, f] * sum_{r, s in R} G[p, r, s])

    (``cos_p = 0`` where either gradient is zero: no conflict measured). Both gradients are
    of losses to be *minimised*, so ``cos_p < 0`` means that a step on the forget objective
    raises the retain loss in that tensor. The scale is ``s_p = 1[cos_p >= threshold]``, or
    with ``soft=True`` ``s_p = clamp((cos_p - threshold) / (1 - threshold), 0, 1)``.

    Args:
        threshold: in [-1, 1); default 0 (drop the tensors where the two conflict).
        forget: index of the forget objective (default 0).
        retain: indices of the retain objectives (default: every other objective).
        soft: a linear ramp instead of a 0/1 mask.
    """

    def __init__(
        self,
        threshold: float = 0.0,
        forget: int = 0,
        retain: Sequence[int] | None = None,
        soft: bool = False,
    ):
        if not isinstance(threshold, (int, float)) or not -1.0 <= float(threshold) < 1.0:
            raise ValueError(f"threshold must be a number in [-1, 1), got {threshold!r}")
        self.threshold = float(threshold)
        self.forget = _check_index("forget", forget)
        self.retain = None if retain is None else _check_indices("retain", retain)
        if self.retain is not None and self.forget in self.retain:
            raise ValueError(f"retain {self.retain} must not contain forget={self.forget}")
        self.soft = bool(soft)

    def cosines(self, per_tensor: torch.Tensor) -> torch.Tensor:
        """``cos_p`` ``[P]`` (the Gram's dtype) between the forget and retain gradients."""
        k = per_tensor.shape[-1]
        retain = (
            self.retain
            if self.retain is not None
            else tuple(i for i in range(k) if i != self.forget)
        )
        _check_k("CosineMask", (self.forget, *retain), k)
        if not retain:
            raise ValueError("CosineMask needs at least one retain objective (K >= 2)")
        idx = torch.tensor(retain, device=per_tensor.device)
        g = per_tensor.double() if per_tensor.dtype == torch.float64 else per_tensor.float()
        fr = g[:, self.forget].index_select(-1, idx).sum(-1)
        rr = g.index_select(1, idx).index_select(2, idx).sum((-1, -2)).clamp(min=0)
        ff = g[:, self.forget, self.forget].clamp(min=0)
        denom = (ff * rr).sqrt()
        return torch.where(
            denom > 0, fr / denom.clamp(min=torch.finfo(g.dtype).tiny), torch.zeros_like(fr)
        )

    def tensor_scale(self, per_tensor: torch.Tensor) -> torch.Tensor:
        cos = self.cosines(per_tensor)
        if self.soft:
            return ((cos - self.threshold) / (1.0 - self.threshold)).clamp(0.0, 1.0)
        return (cos >= self.threshold).to(cos.dtype)

    def __repr__(self) -> str:
        return (
            f"CosineMask(threshold={self.threshold}, forget={self.forget}, "
            f"retain={self.retain}, soft={self.soft})"
        )


class SaliencyMask(ElementMask):
    """Keep the ``fraction`` of entries (or rows) where the forget gradient is largest
    (weight saliency, as in SalUn: Fan et al., 2024, arXiv 2310.12508).

    Score per entry: ``|g_f|`` (``score="forget"``) or ``|g_f| / (|g_R| + eps)``
    (``score="ratio"``: salient for the forget objective and not for the retain one;
    ``g_R = sum_{r in R} g_r``, ``eps`` = 1e-12 plus ``1e-3`` x the mean of ``|g_R|`` over
    all entries, so a zero retain gradient does not make every entry salient). With
    ``unit="row"`` the score is that of a row (the L2 norms of the row of ``g_f`` and
    ``g_R``, over every dim but the first; a 1-D tensor is one row per entry). One global
    threshold over all tensors: the ``ceil(fraction * N)``-th largest of the N scores
    (ties at the threshold are kept).

    Args:
        fraction: in (0, 1], the share of entries (rows) kept.
        score: ``"forget"`` or ``"ratio"``.
        unit: ``"element"`` or ``"row"``.
        forget: index of the forget objective (default 0).
        retain: indices of the retain objectives for ``"ratio"`` (default: every other).
    """

    def __init__(
        self,
        fraction: float = 0.01,
        score: str = "forget",
        unit: str = "element",
        forget: int = 0,
        retain: Sequence[int] | None = None,
    ):
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0.0 < float(fraction) <= 1.0
        ):
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if score not in SALIENCY_SCORES:
            raise ValueError(f"score must be one of {SALIENCY_SCORES}, got {score!r}")
        if unit not in SALIENCY_UNITS:
            raise ValueError(f"unit must be one of {SALIENCY_UNITS}, got {unit!r}")
        self.fraction = float(fraction)
        self.score = score
        self.unit = unit
        self.forget = _check_index("forget", forget)
        self.retain = None if retain is None else _check_indices("retain", retain)

    def _unit_scores(self, g: torch.Tensor) -> torch.Tensor:
        g = g.float()
        if self.unit == "element" or g.dim() < 2:
            return g.abs()
        return g.reshape(g.shape[0], -1).norm(dim=1)

    def scores(self, grads: Sequence[Sequence[torch.Tensor | None]]) -> list[torch.Tensor | None]:
        """Per tensor the scores (entries ``[*shape]`` or rows ``[shape[0]]``), float32;
        ``None`` where the forget gradient is ``None``."""
        k = len(grads)
        retain = (
            self.retain
            if self.retain is not None
            else tuple(i for i in range(k) if i != self.forget)
        )
        _check_k("SaliencyMask", (self.forget, *retain), k)
        forget = [None if g is None else self._unit_scores(g) for g in grads[self.forget]]
        if self.score == "forget":
            return forget
        if not retain:
            raise ValueError("SaliencyMask(score='ratio') needs a retain objective (K >= 2)")
        retain_scores: list[torch.Tensor | None] = []
        total, count = 0.0, 0
        for p, f in enumerate(forget):
            parts = [grads[r][p] for r in retain if grads[r][p] is not None]
            if f is None or not parts:
                retain_scores.append(None)
                continue
            g_r = parts[0].float() if len(parts) == 1 else torch.stack(parts).float().sum(0)
            s = self._unit_scores(g_r)
            retain_scores.append(s)
            total += float(s.sum())
            count += s.numel()
        eps = 1e-12 + 1e-3 * (total / max(count, 1))
        return [
            None if f is None else f / ((r if r is not None else 0.0) + eps)
            for f, r in zip(forget, retain_scores)
        ]

    def element_masks(
        self, grads: Sequence[Sequence[torch.Tensor | None]]
    ) -> list[torch.Tensor | None]:
        scores = self.scores(grads)
        present = [s.reshape(-1) for s in scores if s is not None]
        if not present:
            return [None] * len(scores)
        flat = torch.cat(present)
        keep = max(1, math.ceil(self.fraction * flat.numel()))
        threshold = torch.topk(flat, keep, sorted=False).values.min()
        masks: list[torch.Tensor | None] = []
        for s, g in zip(scores, grads[self.forget]):
            if s is None or g is None:
                masks.append(None)
                continue
            m = (s >= threshold).to(g.dtype)
            if self.unit == "row" and g.dim() >= 2:
                m = m.reshape(-1, *([1] * (g.dim() - 1)))
            masks.append(m)
        return masks

    def __repr__(self) -> str:
        return (
            f"SaliencyMask(fraction={self.fraction}, score={self.score!r}, "
            f"unit={self.unit!r}, forget={self.forget}, retain={self.retain})"
        )


class MaskedAggregator(Aggregator):
    """An aggregator whose targets' contributions are masked (see the module docstring).

    Args:
        inner: the aggregator that chooses the coefficients (any weighting, granularity).
        masks: one or more :class:`TensorMask` / :class:`ElementMask` (their effects
            multiply).
        targets: the objectives whose contributions are masked (default ``(0,)``, the
            forget objective); ``None`` masks every objective's contribution (the whole
            update, as SalUn does).
    """

    def __init__(
        self,
        inner: Aggregator,
        masks: TensorMask | ElementMask | Sequence[TensorMask | ElementMask],
        targets: Sequence[int] | None = (0,),
    ):
        if not isinstance(inner, Aggregator):
            raise TypeError(f"inner must be an Aggregator, got {type(inner).__name__}")
        masks = [masks] if isinstance(masks, (TensorMask, ElementMask)) else list(masks)
        if not masks or not all(isinstance(m, (TensorMask, ElementMask)) for m in masks):
            raise TypeError(
                f"masks must be one or more TensorMask / ElementMask instances, got {masks!r}"
            )
        super().__init__(inner.weighting, inner.granularity)
        self.inner = inner
        self.tensor_masks = [m for m in masks if isinstance(m, TensorMask)]
        self.element_masks = [m for m in masks if isinstance(m, ElementMask)]
        self.targets = None if targets is None else _check_indices("targets", targets)

    def _target_columns(self, k: int, device) -> torch.Tensor:
        cols = torch.zeros(k, dtype=torch.bool, device=device)
        if self.targets is None:
            cols[:] = True
        else:
            _check_k("MaskedAggregator targets", self.targets, k)
            cols[list(self.targets)] = True
        return cols

    def coefficients(self, per_tensor: torch.Tensor, total: torch.Tensor) -> WeightingResult:
        """The inner coefficients, the targets' columns scaled by the tensor masks:
        ``[P, K]`` when there is a tensor mask, else as the inner aggregator gives them."""
        res = self.inner.coefficients(per_tensor, total)
        if not self.tensor_masks:
            return res
        p_count, k = per_tensor.shape[0], per_tensor.shape[-1]
        scale = torch.ones(p_count, dtype=res.coefficients.dtype, device=per_tensor.device)
        for m in self.tensor_masks:
            scale = scale * m.tensor_scale(per_tensor).to(scale.dtype)
        cols = self._target_columns(k, per_tensor.device)
        factor = torch.where(
            cols.unsqueeze(0), scale.unsqueeze(1), torch.ones_like(scale).unsqueeze(1)
        )  # [P, K]
        coefficients = res.coefficients.expand(p_count, k) * factor
        return WeightingResult(res.weights, coefficients, res.active)

    def combine(
        self,
        grads: Sequence[Sequence[torch.Tensor | None]],
        coefficients: torch.Tensor,
        *,
        inplace: bool = False,
    ) -> list[torch.Tensor | None]:
        if self.element_masks:
            k = len(grads)
            masks: list[torch.Tensor | None] = [None] * len(grads[0])
            for em in self.element_masks:
                for p, m in enumerate(em.element_masks(grads)):
                    if m is not None:
                        masks[p] = m if masks[p] is None else masks[p] * m
            targets = range(k) if self.targets is None else self.targets
            _check_k("MaskedAggregator targets", list(targets), k)
            grads = [list(g) for g in grads]
            for t in targets:
                for p, m in enumerate(masks):
                    g = grads[t][p]
                    if m is not None and g is not None:
                        grads[t][p] = g.mul_(m) if inplace else g * m
        return self.inner.combine(grads, coefficients, inplace=inplace)

    def __repr__(self) -> str:
        masks = [*self.tensor_masks, *self.element_masks]
        return f"MaskedAggregator({self.inner!r}, masks={masks!r}, targets={self.targets})"
