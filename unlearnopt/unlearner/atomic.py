"""The atomic update: every method's step ends here, all or nothing.

Inside ``with AtomicStep(...) as step:`` a method may move the parameters directly
(:meth:`AtomicStep.move`, e.g. OFMU's inner ascent; before or after the step) and takes at
most one optimizer step (:meth:`AtomicStep.apply`: write the direction into ``p.grad``,
unscale, clip, the
wrapped optimizer's or the GradScaler's step). If anything in the block raises, or the
GradScaler skips the step, the parameters are restored bit-exactly (from a copy taken at the
first ``move``; none is taken if nothing moves them) and every ``p.grad`` is as it was. The
optimizer state is untouched by construction: ``optimizer.step()`` is the last act, after
every check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The optimizer's parameters with ``requires_grad``, in order, each once."""
    seen: set[int] = set()
    params = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("the optimizer holds no parameter with requires_grad=True")
    return params


class AtomicStep:
    """One all-or-nothing update of ``params`` (see the module docstring).

    Args:
        params: the trainable parameters, in the order of every direction.
        optimizer: the wrapped optimizer.
        max_grad_norm: clip the direction to this norm before the step (None: no clipping).
        scaler: a ``torch.amp.GradScaler`` or None. Directions are then scaled gradients.

    Attributes:
        stepped: True once :meth:`apply` took the optimizer's step.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None,
        scaler: torch.amp.GradScaler | None,
    ):
        self.params = list(params)
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler
        self.stepped = False
        self._grads: list[torch.Tensor | None] = []
        self._saved_params: list[torch.Tensor] | None = None

    def __enter__(self) -> AtomicStep:
        self._grads = [p.grad for p in self.params]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._rollback()

    def _rollback(self) -> None:
        if self._saved_params is not None:
            with torch.no_grad():
                for p, s in zip(self.params, self._saved_params):
                    p.copy_(s)
        for p, g in zip(self.params, self._grads):
            p.grad = g

    def move(
        self, delta: Sequence[torch.Tensor | None], *, alpha: Sequence[float] | None = None
    ) -> None:
        """θ ← θ + alpha·delta (P tensors, None = no change; ``alpha`` one factor per
        parameter, default 1), not through the optimizer. Before :meth:`apply` the move is
        undone if the update fails (a copy of the parameters is kept from the first move);
        after a step that was taken it is final and needs no copy."""
        if len(delta) != len(self.params):
            raise ValueError(f"delta has {len(delta)} tensors, expected {len(self.params)}")
        alpha = [1.0] * len(self.params) if alpha is None else list(alpha)
        if len(alpha) != len(self.params):
            raise ValueError(f"alpha has {len(alpha)} factors, expected {len(self.params)}")
        if self._saved_params is None and not self.stepped:
            self._saved_params = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, d, a in zip(self.params, delta, alpha):
                if d is not None:
                    p.add_(d.to(p.dtype), alpha=a)

    def apply(self, direction: Sequence[torch.Tensor | None], *, overflow: bool = False) -> bool:
        """Write ``direction`` (P tensors, scaled by the GradScaler's scale if any) into
        ``p.grad``, clip, and take the wrapped optimizer's step. ``overflow``: the scaled
        gradients overflowed, make the GradScaler see it (it then skips the step and backs
        off). Returns False if the step was skipped; then everything is restored."""
        if len(direction) != len(self.params):
            raise ValueError(
                f"direction has {len(direction)} tensors, expected "
                f"{len(self.params)} (one per trainable parameter)"
            )
        for p, d in zip(self.params, direction):
            if d is not None and d.shape != p.shape:
                raise ValueError(
                    f"direction tensor of shape {tuple(d.shape)} for a "
                    f"parameter of shape {tuple(p.shape)}"
                )
        if overflow:
            first = next(d for d in direction if d is not None)
            first.fill_(float("inf"))
        for p, d in zip(self.params, direction):
            p.grad = None if d is None else d.to(p.dtype)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.stepped = self.scaler.get_scale() >= before
        else:
            self.optimizer.step()
            self.stepped = True
        if not self.stepped:
            self._rollback()
        return self.stepped
