"""Hessian-vector products over lists of parameter tensors, two ways.

A gradient here is a list of tensors, one per parameter, in the order of ``params``.
``H v`` is the Hessian of a scalar loss L(θ) applied to a vector v given in the same
list form.

- ``autograd``: ``H v = d/dθ <∇L(θ), v>`` by double backward. Exact, but every op between
  the parameters and the loss must be twice differentiable: the fused loss kernels are not
  (their backward is a hand-written kernel), so losses must go through the pure-PyTorch
  reference path (``backend="reference"``, which float64 inputs take automatically), and
  attention must be an implementation with a double backward (``attn_implementation="eager"``
  for Hugging Face models).
- ``finite_difference``: ``H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε`` with ε scaled so that the
  perturbation εv has norm ``eps`` (global norm over all tensors). Needs only first-order
  gradients, so it works with every kernel and with models too large for double backward.
  Truncation error O(ε²·‖∇³L‖·‖v‖³), rounding error O(u·‖∇L‖/ε) with u the unit roundoff.
  It moves the parameters in place and restores them from a saved copy (bit-exact restore,
  one copy of the trainable parameters of extra memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

HVP_MODES = ("autograd", "finite_difference")

GradFn = Callable[[], list[torch.Tensor]]
"""A closure returning the gradient (list of tensors, one per parameter) at the current θ."""


def zeros_like_list(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) for p in params]


def gradients(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> list[torch.Tensor]:
    """``∇loss`` w.r.t. ``params`` as a list; parameters the loss does not reach get zeros."""
    grads = torch.autograd.grad(
        loss, list(params), create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global inner product of two tensor lists (0-dim tensor, stays on the device)."""
    total = None
    for x, y in zip(xs, ys):
        term = (x * y).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("dot of two empty tensor lists")
    return total


def global_norm(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return dot(xs, xs).sqrt()


def hvp_autograd(
    grads_with_graph: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool = True,
) -> list[torch.Tensor]:
    """``H v`` by double backward.

    Args:
        grads_with_graph: ``∇L`` computed with ``create_graph=True`` (one tensor per param).
        params: the parameters, same order.
        vectors: ``v``, same shapes; treated as constants (detached).
        create_graph: keep the graph of the result (for a further derivative, e.g. the
            outer step of OFMU in ``autograd`` mode).
        retain_graph: keep the graph of ``grads_with_graph`` for more products (default).

    Returns:
        ``H v`` as a list of tensors shaped like ``params``.
    """
    vectors = [v.detach() for v in vectors]
    # Only gradients that carry a graph can be differentiated again; a zero gradient of an
    # unused parameter contributes nothing to <∇L, v>.
    pairs = [(g, v) for g, v in zip(grads_with_graph, vectors) if g.requires_grad]
    if not pairs:
        return zeros_like_list(params)
    inner = dot([g for g, _ in pairs], [v for _, v in pairs])
    return gradients(inner, params, create_graph=create_graph, retain_graph=retain_graph)


@contextlib.contextmanager
def saved_parameters(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Restore ``params`` bit-exactly on exit (θ + εv − εv is not θ in floating point)."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def finite_difference_step(vectors: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """The scalar ε/‖v‖ (0-dim tensor) that makes the perturbation have global norm ``eps``."""
    norm = global_norm([v.detach() for v in vectors])
    # A zero direction: any step works, the difference is 0 anyway.
    return eps / torch.where(norm > 0, norm, torch.ones_like(norm))


def hvp_finite_difference(
    grad_fn: GradFn,
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    eps: float = 1e-3,
) -> list[torch.Tensor]:
    """``H v ≈ (∇L(θ + hv) − ∇L(θ − hv)) / 2h`` with ``h = eps / ‖v‖``.

    Args:
        grad_fn: evaluates ``∇L`` at the current parameter values (first-order only).
        params: the parameters ``grad_fn`` differentiates, modified in place during the
            call and restored exactly afterwards.
        vectors: ``v``, shaped like ``params``.
        eps: norm of the perturbation. In float32 about 1e-3 balances truncation against
            rounding (u ≈ 6e-8); in float64 about 1e-5 (u ≈ 1e-16).

    Returns:
        the approximation of ``H v``, a list of tensors shaped like ``params``.
    """
    return directional_derivative(grad_fn, params, vectors, eps)


def directional_derivative(
    fn: GradFn, params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor], eps: float
) -> list[torch.Tensor]:
    """Central difference of any list-valued function of θ along ``v`` (its Jacobian times v).

    With ``fn = ∇L`` this is ``H v``; OFMU also applies it to ``fn = ∇Φ`` (``H_Φ v``).
    """
    vectors = [v.detach() for v in vectors]
    h = finite_difference_step(vectors, eps)
    with saved_parameters(params):
        with torch.no_grad():
            for p, v in zip(params, vectors):
                p.add_(v.to(p.dtype) * h)
        plus = [g.detach() for g in fn()]
        with torch.no_grad():
            for p, v in zip(params, vectors):
                p.sub_(v.to(p.dtype) * (2 * h))
        minus = [g.detach() for g in fn()]
    return [(a - b) / (2 * h) for a, b in zip(plus, minus)]
