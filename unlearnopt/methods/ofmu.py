"""OFMU: bi-level unlearning with a similarity-aware inner objective (arXiv 2509.22483).

With L_f = ``nll`` on the forget batch and L_r = ``nll`` on the retain
batch (both means over the labelled, shifted tokens), g_f = ∇L_f, g_r = ∇L_r:

    inner (maximised):  Φ(θ) = L_f(θ) − β·cos(g_f(θ), g_r(θ))
    outer (minimised):  L_r(θ) + ρ·‖∇Φ(θ)‖²

``cos`` is the global cosine of the two gradients (``granularity="global"``) or the mean over
the P trainable tensors of the per-tensor cosines (``"per_tensor"``); both come from
``grad_gram``. A tensor where either gradient is exactly zero has cosine 0 and contributes no
gradient (it still counts in the mean's P).

One ``step()``, all on the same forget/retain batches:

1. T inner ascent steps (``inner_steps``, default 5), applied to the trainable parameters
   *directly*, not through the wrapped optimizer (its state, e.g. Adam's moments, only
   sees outer steps)::

       θ ← θ + η_in ∇Φ(θ)          η_in = inner_lr (default 3e-5), or each parameter group's
                                   current ``lr`` of the wrapped optimizer when inner_lr is
                                   None, so LR schedulers scale the inner steps too.

2. one outer step through the wrapped optimizer (clipping etc. by the unlearner), at the θ
   reached by the inner loop, along

       d = ∇L_r + 2ρ·H_Φ ∇Φ          (= ∇ of the outer objective)

3. ρ ← γ·ρ (the paper's schedule ρ_{k+1} = γ ρ_k); ρ is the method's state (``state_dict``).

If the step fails (a non-finite loss, cosine or direction raises ``UnlearningStepError``;
a GradScaler-style skip), the parameters are restored to their values before the inner loop,
the optimizer has not stepped and ρ is unchanged.

The gradient of the cosine (global case; per-tensor: the same per tensor, divided by P):

    ∇cos = H_f a + H_r b,   a = g_r/(‖g_f‖‖g_r‖) − cos·g_f/‖g_f‖²,
                            b = g_f/(‖g_f‖‖g_r‖) − cos·g_r/‖g_r‖²

so ∇Φ = g_f − β(H_f a + H_r b). Two ways to get the Hessian products (``hvp``):

- ``"finite_difference"`` (default): H v ≈ (∇L(θ+hv) − ∇L(θ−hv))/2h with ‖hv‖ = ``fd_eps``,
  first-order gradients only, so the fused loss kernels are used. ∇Φ costs 6 gradient
  evaluations (g_f, g_r, 2 per product); H_Φ ∇Φ is a central difference of ∇Φ itself along
  ∇Φ (12 more: the nested differences are exact to O(h²) plus rounding).
- ``"autograd"``: exact, by double backward: Φ is built with ``create_graph`` and
  differentiated (∇Φ), and the outer product H_Φ ∇Φ = ∇⟨∇Φ, v⟩ with v = ∇Φ detached is a
  third-order derivative of the losses. The losses then run on the pure-PyTorch reference
  path (``backend="reference"``: the fused kernels have no double backward) and every model
  op must be differentiable three times (Hugging Face: ``attn_implementation="eager"``).
  For small models and tests.

Cost per ``step()`` in gradient evaluations (forward + backward of one batch),
``finite_difference``: 6·T + 6 with β > 0 (T = 5: 36), plus 12 when ρ > 0 (the product
H_Φ ∇Φ; skipped at ρ = 0); 2·T + 6 with β = 0. GA is 1. Measured on the tiny test Llama
(B = 4, T = 32, CPU, one thread) with ρ > 0: 40× a GA step, T = 1: 16×, β = 0: 10×,
``autograd``: 35×. The ≤ 2.5× goal is not met by the exact method.

Defaults: T = 5, β = 1 (the cosine is in [−1, 1], commensurate with a token-mean loss),
γ = 1.05, ``inner_lr = 3e-5`` and ``rho = 0``, the last two measured on SmolLM2-135M
(docs/method_measurements.md): the inner steps do the forgetting, and any ρ > 0 let the
penalty's term dominate the outer direction and cost retain accuracy.

Single process only: the Hessian products run their own ``autograd.grad`` calls, which
DDP's reducer does not average; under ``torch.distributed`` with more than one rank this
method raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from unlearnopt.contract import Batch, Objective, ObjectiveContext, StepRecipe, StepTools
from unlearnopt.methods.base import Method
from unlearnopt.methods.hvp import (
    HVP_MODES,
    directional_derivative,
    global_norm,
    gradients,
    hvp_finite_difference,
)
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import token_loss_of

GRANULARITIES = ("global", "per_tensor")
LossFn = Callable[[], torch.Tensor]


def _gram(grads: Sequence[Sequence[torch.Tensor]]):
    from unlearnopt.ops.grad_gram import grad_gram

    return grad_gram(grads, reduce=False)


def cosine(gf: Sequence[torch.Tensor], gr: Sequence[torch.Tensor],
           granularity: str) -> torch.Tensor:
    """cos(g_f, g_r) as a 0-dim tensor, global or mean of per-tensor; differentiable when the
    gradients carry a graph (``grad_gram`` then takes its reference path)."""
    gram = _gram([list(gf), list(gr)])
    g = gram.total.unsqueeze(0) if granularity == "global" else gram.per_tensor
    nf2, nr2, fr = g[:, 0, 0], g[:, 1, 1], g[:, 0, 1]
    ok = (nf2 > 0) & (nr2 > 0)
    # where() on both sides: no NaN gradient flows from the masked-out branch.
    denom = torch.where(ok, (nf2 * nr2).clamp(min=torch.finfo(g.dtype).tiny).sqrt(),
                        torch.ones_like(nf2))
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

    def __init__(self, params: Sequence[torch.Tensor], forget_loss: LossFn, retain_loss: LossFn,
                 *, beta: float, granularity: str, hvp: str, fd_eps: float):
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
                    " or use hvp='finite_difference'") from e
            raise

    def _phi_gradient_autograd_impl(self, create_graph: bool):
        lf, lr = self.forget_loss(), self.retain_loss()
        if self.beta == 0.0:
            dphi = gradients(lf, self.params, create_graph=create_graph)
            gr = gradients(lr, self.params)
            cos = torch.zeros((), dtype=lf.dtype, device=lf.device)
            return dphi, gr, {"loss_forget": lf.detach(), "loss_retain": lr.detach(),
                              "cos": cos, "phi": lf.detach()}
        gf = gradients(lf, self.params, create_graph=True)
        gr = gradients(lr, self.params, create_graph=True)
        cos = cosine(gf, gr, self.granularity)
        phi = lf - self.beta * cos
        dphi = gradients(phi, self.params, create_graph=create_graph)
        info = {"loss_forget": lf.detach(), "loss_retain": lr.detach(), "cos": cos.detach(),
                "phi": phi.detach()}
        return dphi, [g.detach() for g in gr], info

    def _phi_gradient_fd(self):
        with torch.enable_grad():
            lf = self.forget_loss()
            gf = [g.detach() for g in gradients(lf, self.params)]
            lr = self.retain_loss()
            gr = [g.detach() for g in gradients(lr, self.params)]
        if self.beta == 0.0:
            cos = torch.zeros((), dtype=lf.dtype, device=lf.device)
            return gf, gr, {"loss_forget": lf.detach(), "loss_retain": lr.detach(), "cos": cos,
                            "phi": lf.detach()}
        cos, a, b = cosine_directions(gf, gr, self.granularity)
        hf_a = hvp_finite_difference(lambda: self._grad(self.forget_loss), self.params, a,
                                     self.fd_eps)
        hr_b = hvp_finite_difference(lambda: self._grad(self.retain_loss), self.params, b,
                                     self.fd_eps)
        dphi = [f - self.beta * (x + y) for f, x, y in zip(gf, hf_a, hr_b)]
        info = {"loss_forget": lf.detach(), "loss_retain": lr.detach(), "cos": cos,
                "phi": lf.detach() - self.beta * cos}
        return dphi, gr, info

    def ascent_direction(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """``(∇Φ(θ), info)``: the inner ascent step is θ ← θ + lr ∇Φ(θ); info at θ."""
        dphi, _, info = self.phi_gradient()
        info["grad_norm_phi"] = global_norm(dphi)
        return dphi, info

    def outer_direction(self, rho: float):
        """``(d, info)``: d = ∇L_r + 2ρ·H_Φ ∇Φ at the current θ (list like ``params``)."""
        if rho == 0:   # the penalty is off: skip the Hessian product H_Φ ∇Φ (12 gradient
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
            h_phi_v = directional_derivative(lambda: self.phi_gradient()[0], self.params, v,
                                             self.fd_eps)
        direction = list(gr) if h_phi_v is None else [
            g + (2.0 * rho) * h.to(g.dtype) for g, h in zip(gr, h_phi_v)]
        info["grad_norm_phi"] = global_norm(v)
        info["grad_norm_retain"] = global_norm(gr)
        return direction, info


def _batch_loss(tools: StepTools, objective: Objective, batches: list[Batch]) -> LossFn:
    """A closure computing ``objective``'s mean over all of ``batches`` at the current θ,
    with a graph to the parameters: each micro-batch weighted by its share of the units."""
    counts = [objective.units(b) for b in batches]
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


class OFMU(Method):
    """OFMU (arXiv 2509.22483), see the module docstring for the exact step.

    Options:
        beta: weight of the cosine penalty in Φ (≥ 0; 0 skips every Hessian product of the
            inner steps). Default 1.0.
        rho: initial penalty ρ_0 of the outer objective (≥ 0). Default 0 (measured, see the
            module docstring): the outer step is then a plain step on the retain loss.
        gamma: growth factor, ρ ← γρ after every outer step (≥ 1). Default 1.05.
        inner_steps: T ≥ 0 inner ascent steps per ``step()``. Default 5.
        inner_lr: step size of the inner ascent (default 3e-5, measured on SmolLM2-135M);
            None: each parameter group's current ``lr`` in the wrapped optimizer.
        granularity: ``"global"`` (default) or ``"per_tensor"`` cosine.
        hvp: ``"finite_difference"`` (default) or ``"autograd"`` (exact; reference-path
            losses, thrice-differentiable model ops).
        fd_eps: norm of the finite-difference perturbation. Default 1e-3 (float32); use
            ~1e-4 in float64.
    """

    name = "ofmu"
    defaults: ClassVar[Mapping[str, Any]] = {
        "beta": 1.0, "rho": 0.0, "gamma": 1.05, "inner_steps": 5, "inner_lr": 3e-5,
        "granularity": "global", "hvp": "finite_difference", "fd_eps": 1e-3}
    needs_ref = False

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.rho = float(self.config["rho"])
        self.outer_steps = 0

    def validate_config(self) -> None:
        c = self.config
        for key in ("beta", "rho", "gamma", "fd_eps"):
            v = c[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"ofmu: {key} must be a finite number, got {v!r}")
        if c["beta"] < 0 or c["rho"] < 0:
            raise ValueError(f"ofmu: beta and rho must be >= 0, got beta={c['beta']!r}, "
                             f"rho={c['rho']!r}")
        if c["gamma"] < 1:
            raise ValueError(f"ofmu: gamma must be >= 1 (rho grows), got {c['gamma']!r}")
        if c["fd_eps"] <= 0:
            raise ValueError(f"ofmu: fd_eps must be > 0, got {c['fd_eps']!r}")
        t = c["inner_steps"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"ofmu: inner_steps must be an int >= 0, got {t!r}")
        lr = c["inner_lr"]
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or not math.isfinite(lr) or lr < 0):
            raise ValueError(f"ofmu: inner_lr must be None or a finite number >= 0, got {lr!r}")
        if c["granularity"] not in GRANULARITIES:
            raise ValueError(f"ofmu: granularity must be one of {GRANULARITIES}, "
                             f"got {c['granularity']!r}")
        if c["hvp"] not in HVP_MODES:
            raise ValueError(f"ofmu: hvp must be one of {HVP_MODES}, got {c['hvp']!r}")

    def objectives(self) -> list[Objective]:
        """L_f and L_r: the mean next-token NLL of the forget and of the retain batch
        (``hvp="autograd"``: on the plain-PyTorch reference path, which autograd can
        differentiate three times)."""
        backend = "reference" if self.config["hvp"] == "autograd" else None

        def nll(ctx: ObjectiveContext) -> torch.Tensor:
            return token_loss_of(ctx, "nll", backend=backend)

        return [Objective("forget_nll", "forget", nll), Objective("retain_nll", "retain", nll)]

    def aggregator(self):
        raise NotImplementedError("ofmu combines its gradients in its own step(), not through "
                                  "an aggregator")

    @property
    def needs_retain(self) -> bool:
        return True

    def _inner_lrs(self, tools: StepTools) -> list[float]:
        if self.config["inner_lr"] is not None:
            return [float(self.config["inner_lr"])] * len(tools.params)
        return tools.learning_rates()

    def step_recipe(self) -> StepRecipe:
        return self._bilevel_step

    def _bilevel_step(self, tools: StepTools, forget, retain) -> dict[str, float]:
        """T inner ascent steps on Φ moved directly, one outer step through the optimizer;
        all of it undone if the step fails."""
        if tools.world_size > 1:
            raise NotImplementedError("ofmu runs in a single process (its Hessian products "
                                      "are not reduced across ranks)")
        if tools.scaler is not None:
            raise NotImplementedError("ofmu does not support a GradScaler (fp16 loss scaling); "
                                      "use bf16 autocast or float32")
        c = self.config
        batches = {}
        for kind, batch in (("forget", forget), ("retain", retain)):
            if batch is None:
                raise ValueError(f"ofmu needs a {kind} batch, got None")
            batches[kind] = tools.micro_batches(batch, kind)
        forget_obj, retain_obj = self.objectives()
        engine = OFMUEngine(tools.params, _batch_loss(tools, forget_obj, batches["forget"]),
                            _batch_loss(tools, retain_obj, batches["retain"]),
                            beta=float(c["beta"]), granularity=c["granularity"], hvp=c["hvp"],
                            fd_eps=float(c["fd_eps"]))
        lrs = self._inner_lrs(tools)
        with tools.atomic() as update:
            first: dict[str, torch.Tensor] | None = None
            for _ in range(c["inner_steps"]):
                dphi, info = engine.ascent_direction()
                update.move(dphi, alpha=lrs)
                first = info if first is None else first
            direction, info = engine.outer_direction(self.rho)
            values = {"loss/forget_nll": info["loss_forget"],
                      "loss/retain_nll": info["loss_retain"], "ofmu/cos": info["cos"],
                      "ofmu/phi": info["phi"], "grad_norm/phi": info["grad_norm_phi"],
                      "grad_norm/retain_nll": info["grad_norm_retain"]}
            if first is not None:
                values.update({"loss/forget_nll_before_inner": first["loss_forget"],
                               "ofmu/phi_before_inner": first["phi"],
                               "ofmu/cos_before_inner": first["cos"]})
            values["grad_norm/direction"] = global_norm(direction)
            stats = tools.read_stats(values)          # the step's one host sync
            update.apply(direction)
        if update.stepped:
            self.rho *= float(c["gamma"])
            self.outer_steps += 1
        stats["skipped"] = 0.0 if update.stepped else 1.0
        stats["ofmu/rho"] = self.rho
        return stats

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(rho=self.rho, outer_steps=self.outer_steps)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rho = float(state["rho"])
        self.outer_steps = int(state.get("outer_steps", 0))


register_method("ofmu", OFMU)
