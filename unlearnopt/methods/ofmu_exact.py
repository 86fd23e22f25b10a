"""The exact bi-level OFMU step: Hessian-vector products of the cosine penalty.

With L_f, L_r the forget and retain losses, g_f = ∇L_f, g_r = ∇L_r and

    Φ(θ) = L_f(θ) − β·cos(g_f(θ), g_r(θ)),

the gradient of the cosine (global case; per-tensor: the same per tensor, divided by P) is

    ∇cos = H_f a + H_r b,   a = g_r/(‖g_f‖‖g_r‖) − cos·g_f/‖g_f‖²,
                            b = g_f/(‖g_f‖‖g_r‖) − cos·g_r/‖g_r‖²

(a = ∂cos/∂g_f and b = ∂cos/∂g_r, chained through the Jacobians of the gradients, which are
the Hessians H_f, H_r), so ∇Φ = g_f − β(H_f a + H_r b). The outer objective
L_r + ρ‖∇Φ‖² has the gradient ∇L_r + 2ρ·H_Φ ∇Φ. Two ways to get the Hessian products:

- ``"finite_difference"``: H v ≈ (∇L(θ+hv) − ∇L(θ−hv))/2h with ‖hv‖ = ``fd_eps``,
  first-order gradients only, so the fused loss kernels are used. ∇Φ costs 6 gradient
  evaluations (g_f, g_r, 2 per product); H_Φ ∇Φ is a central difference of ∇Φ itself along
  ∇Φ (12 more: the nested differences are exact to O(h²) plus rounding).
- ``"autograd"``: exact, by double backward: Φ is built with ``create_graph`` and
  differentiated (∇Φ), and the outer product H_Φ ∇Φ = ∇⟨∇Φ, v⟩ with v = ∇Φ detached is a
  third-order derivative of the losses. The losses then run on the pure-PyTorch reference
  path (``backend="reference"``: the fused kernels have no double backward) and every model
  op must be differentiable three times (Hugging Face: ``attn_implementation="eager"``).
  For small models and tests.

Both run in a single process: the Hessian products run their own ``autograd.grad`` calls,
which DDP's reducer does not average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from unlearnopt.contract import Batch, Objective, StepTools
from unlearnopt.methods.hvp import (
    directional_derivative,
    global_norm,
    gradients,
    hvp_finite_difference,
)

LossFn = Callable[[], torch.Tensor]


def _gram(grads: Sequence[Sequence[torch.Tensor]]):
    from unlearnopt.ops.grad_gram import grad_gram

    return grad_gram(grads, reduce=False)


def cosine(
    gf: Sequence[torch.Tensor], gr: Sequence[torch.Tensor], granularity: str
) -> torch.Tensor:
    """cos(g_f, g_r) as a 0-dim tensor, global or mean of per-tensor; differentiable when the
    gradients carry a graph (``grad_gram`` then takes its reference path)."""
    gram = _gram([list(gf), list(gr)])
    g = gram.total.unsqueeze(0) if granularity == "global" else gram.per_tensor
    nf2, nr2, fr = g[:, 0, 0], g[:, 1, 1], g[:, 0, 1]
    ok = (nf2 > 0) & (nr2 > 0)
    # where() on both sides: no NaN gradient flows from the masked-out branch.
    denom = torch.where(
        ok, (nf2 * nr2).clamp(min=torch.finfo(g.dtype).tiny).sqrt(), torch.ones_like(nf2)
    )
    cos = torch.where(ok, fr / denom, torch.zeros_like(fr))
    return cos.mean()


def cosine_directions(gf: Sequence[torch.Tensor], gr: Sequence[torch.Tensor], granularity: str):
    """``(cos, a, b)`` with ∇cos = H_f a + H_r b (module docstring); no graph."""
    gram = _gram([[t.detach() for t in gf], [t.detach() for t in gr]])
    if granularity == "global":
        g = gram.total.unsqueeze(0).expand(len(gf), 2, 2)
        scale = 1.0
    else:
        g = gram.per_tensor
        scale = 1.0 / len(gf)
    nf2, nr2, fr = g[:, 0, 0], g[:, 1, 1], g[:, 0, 1]
    ok = (nf2 > 0) & (nr2 > 0)
    one = torch.ones_like(nf2)
    nf2s, nr2s = torch.where(ok, nf2, one), torch.where(ok, nr2, one)
    inv = torch.where(ok, (nf2s * nr2s).rsqrt(), torch.zeros_like(nf2))  # 1/(‖g_f‖‖g_r‖)
    cos_p = fr * inv
    # Per tensor p: a_p = c_r[p] g_r + c_f[p] g_f, b_p = c_f'[p] g_f + c_r'[p] g_r.
    a_r, a_f = inv * scale, torch.where(ok, -cos_p / nf2s, torch.zeros_like(nf2)) * scale
    b_f, b_r = inv * scale, torch.where(ok, -cos_p / nr2s, torch.zeros_like(nf2)) * scale
    a, b = [], []
    for i, (f, r) in enumerate(zip(gf, gr)):
        f, r = f.detach(), r.detach()
        a.append(r * a_r[i].to(r.dtype) + f * a_f[i].to(f.dtype))
        b.append(f * b_f[i].to(f.dtype) + r * b_r[i].to(r.dtype))
    cos = cos_p[0] if granularity == "global" else cos_p.mean()
    return cos, a, b


class OFMUEngine:
    """The OFMU computations on a list of parameters and two loss closures.

    Args:
        params: the trainable parameters (updated in place by :meth:`inner_step`).
        forget_loss, retain_loss: closures computing L_f, L_r (0-dim) at the current θ
            with a graph to ``params``. For ``hvp="autograd"`` they must be twice (thrice for
            :meth:`outer_direction`) differentiable.
        beta, granularity, hvp, fd_eps: see :class:`OFMU`.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        forget_loss: LossFn,
        retain_loss: LossFn,
        *,
        beta: float,
        granularity: str,
        hvp: str,
        fd_eps: float,
    ):
        self.params = list(params)
        self.forget_loss, self.retain_loss = forget_loss, retain_loss
        self.beta, self.granularity, self.hvp, self.fd_eps = beta, granularity, hvp, fd_eps

    def _grad(self, loss_fn: LossFn) -> list[torch.Tensor]:
        return [g.detach() for g in gradients(loss_fn(), self.params)]

    def phi_gradient(self, *, create_graph: bool = False):
        """``(∇Φ, g_r, info)`` at the current θ; info holds 0-dim tensors
        ``loss_forget``, ``loss_retain``, ``cos``, ``phi``. With ``create_graph``
        (autograd mode only) ∇Φ keeps its graph for a further derivative."""
        if self.hvp == "autograd":
            return self._phi_gradient_autograd(create_graph)
        if create_graph:
            raise ValueError("create_graph needs hvp='autograd'")
        return self._phi_gradient_fd()

    def _phi_gradient_autograd(self, create_graph: bool):
        try:
            return self._phi_gradient_autograd_impl(create_graph)
        except RuntimeError as e:
            if "derivative for" in str(e) and "not implemented" in str(e):
                raise RuntimeError(
                    "ofmu hvp='autograd' differentiates the model two or three times and an op "
                    f"has no higher derivative ({e}); for Hugging Face models load them with "
                    "attn_implementation='eager' (or call model.set_attn_implementation('eager')),"
                    " or use hvp='finite_difference'"
                ) from e
            raise

    def _phi_gradient_autograd_impl(self, create_graph: bool):
        lf, lr = self.forget_loss(), self.retain_loss()
        if self.beta == 0.0:
            dphi = gradients(lf, self.params, create_graph=create_graph)
            gr = gradients(lr, self.params)
            cos = torch.zeros((), dtype=lf.dtype, device=lf.device)
            return (
                dphi,
                gr,
                {
                    "loss_forget": lf.detach(),
                    "loss_retain": lr.detach(),
                    "cos": cos,
                    "phi": lf.detach(),
                },
            )
        gf = gradients(lf, self.params, create_graph=True)
        gr = gradients(lr, self.params, create_graph=True)
        cos = cosine(gf, gr, self.granularity)
        phi = lf - self.beta * cos
        dphi = gradients(phi, self.params, create_graph=create_graph)
        info = {
            "loss_forget": lf.detach(),
            "loss_retain": lr.detach(),
            "cos": cos.detach(),
            "phi": phi.detach(),
        }
        return dphi, [g.detach() for g in gr], info

    def _phi_gradient_fd(self):
        with torch.enable_grad():
            lf = self.forget_loss()
            gf = [g.detach() for g in gradients(lf, self.params)]
            lr = self.retain_loss()
            gr = [g.detach() for g in gradients(lr, self.params)]
        if self.beta == 0.0:
            cos = torch.zeros((), dtype=lf.dtype, device=lf.device)
            return (
                gf,
                gr,
                {
                    "loss_forget": lf.detach(),
                    "loss_retain": lr.detach(),
                    "cos": cos,
                    "phi": lf.detach(),
                },
            )
        cos, a, b = cosine_directions(gf, gr, self.granularity)
        hf_a = hvp_finite_difference(
            lambda: self._grad(self.forget_loss), self.params, a, self.fd_eps
        )
        hr_b = hvp_finite_difference(
            lambda: self._grad(self.retain_loss), self.params, b, self.fd_eps
        )
        dphi = [f - self.beta * (x + y) for f, x, y in zip(gf, hf_a, hr_b)]
        info = {
            "loss_forget": lf.detach(),
            "loss_retain": lr.detach(),
            "cos": cos,
            "phi": lf.detach() - self.beta * cos,
        }
        return dphi, gr, info

    def ascent_direction(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """``(∇Φ(θ), info)``: the inner ascent step is θ ← θ + lr ∇Φ(θ); info at θ."""
        dphi, _, info = self.phi_gradient()
        info["grad_norm_phi"] = global_norm(dphi)
        return dphi, info

    def outer_direction(self, rho: float):
        """``(d, info)``: d = ∇L_r + 2ρ·H_Φ ∇Φ at the current θ (list like ``params``)."""
        if rho == 0:  # the penalty is off: skip the Hessian product H_Φ ∇Φ (12 gradient
            # evaluations with finite differences, a third-order backward with autograd)
            dphi, gr, info = self.phi_gradient()
            v, h_phi_v = dphi, None
        elif self.hvp == "autograd":
            dphi, gr, info = self.phi_gradient(create_graph=True)
            v = [t.detach() for t in dphi]
            pairs = [(t, x) for t, x in zip(dphi, v) if t.requires_grad]
            if pairs:
                inner = sum((t * x).sum() for t, x in pairs)
                h_phi_v = [g.detach() for g in gradients(inner, self.params)]
            else:  # Φ's gradient does not depend on θ (e.g. linear losses)
                h_phi_v = [torch.zeros_like(p) for p in self.params]
        else:
            dphi, gr, info = self.phi_gradient()
            v = dphi
            h_phi_v = directional_derivative(
                lambda: self.phi_gradient()[0], self.params, v, self.fd_eps
            )
        direction = (
            list(gr)
            if h_phi_v is None
            else [g + (2.0 * rho) * h.to(g.dtype) for g, h in zip(gr, h_phi_v)]
        )
        info["grad_norm_phi"] = global_norm(v)
        info["grad_norm_retain"] = global_norm(gr)
        return direction, info


def batch_loss(tools: StepTools, objective: Objective, batches: list[Batch]) -> LossFn:
    """A closure computing ``objective``'s mean over all of ``batches`` at the current θ,
    with a graph to the parameters: each micro-batch weighted by its share of the units."""
    counts = [objective.units(b) for b in batches]
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # host syncs
    if labelled == 0:
        raise ValueError(
            f"the {objective.batch} batch has no labelled token (every label is "
            "-100 after the next-token shift), so its losses average over "
            "nothing; parameters and optimizer state are unchanged"
        )
    total = sum(counts[1:], counts[0]).clamp(min=1)

    def loss() -> torch.Tensor:
        out = None
        for b, n in zip(batches, counts):
            share = (n / total).to(torch.float64)
            term = objective.loss(tools.context(b, objective.batch))
            term = term * share.to(term.dtype)
            out = term if out is None else out + term
        return out

    return loss
