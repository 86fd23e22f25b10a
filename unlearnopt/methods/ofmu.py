"""OFMU: bi-level unlearning with a similarity-aware inner objective (arXiv 2509.22483).

With L_f = ``nll`` on the forget batch and L_r = ``nll`` on the retain batch (both means over
the labelled, shifted tokens; ``unlearnopt.objectives.token_loss``), g_f = ∇L_f, g_r = ∇L_r:

    inner (maximised):  Φ(θ) = L_f(θ) − β·cos(g_f(θ), g_r(θ))
    outer (minimised):  L_r(θ) + ρ·‖∇Φ(θ)‖²

``cos`` is the global cosine of the two gradients (``granularity="global"``) or the mean over
the P trainable tensors of the per-tensor cosines (``"per_tensor"``); both come from
``grad_gram``. A tensor where either gradient is exactly zero has cosine 0 and contributes no
gradient (it still counts in the mean's P).

One ``step()``, all on the same forget/retain batches:

1. T inner ascent steps (``inner_steps``), applied to the trainable parameters *directly*,
   not through the wrapped optimizer (its state, e.g. Adam's moments, only sees outer
   steps): θ ← θ + η ∇Φ(θ), η = ``inner_lr``, or each parameter group's current ``lr`` of
   the wrapped optimizer when inner_lr is None (so LR schedulers scale the inner steps too);
2. one outer step through the wrapped optimizer (clipping, GradScaler checks), at the θ'
   reached by the inner loop, along the outer gradient d = ∇L_r(θ') + 2ρ·H_Φ ∇Φ(θ');
3. ρ ← γ·ρ (the paper's schedule ρ_{k+1} = γ ρ_k); ρ is the method's state (``state_dict``).

If the step fails (a non-finite loss, cosine or direction raises ``UnlearningStepError``;
a GradScaler-style skip), the unlearner's atomic update restores the parameters to their
values before the inner loop, the optimizer has not stepped and ρ is unchanged.

**First order (``hvp="first_order"``, the default).** Chaining cos through the gradients,

    ∇cos = H_f a + H_r b,   a = ∂cos/∂g_f = g_r/(‖g_f‖‖g_r‖) − cos·g_f/‖g_f‖²,
                            b = ∂cos/∂g_r = g_f/(‖g_f‖‖g_r‖) − cos·g_r/‖g_r‖²

(per tensor: the same on each tensor's gradients). The first-order step approximates
H_f a + H_r b without any Hessian product, so that the inner direction u is a combination
c_f g_f + c_r g_r whose coefficients come from the 2×2 Gram matrix of the two gradients
(``FirstOrderWeights``). Two forms (``ascent``):

- ``"identity"``: every Hessian replaced by the identity (the per-tensor mean divides by P):

      u = g_f − β(a + b),  c_f = 1 − β(1/(‖g_f‖‖g_r‖) − cos/‖g_f‖²),
                           c_r = −β(1/(‖g_f‖‖g_r‖) − cos/‖g_r‖²),

  moved as θ ← θ + η u. Exact when H_f = H_r = I (e.g. L = ½‖θ − c‖²). Its b term,
  −β(ĝ_f − cos ĝ_r)/‖g_r‖ (ĝ = g/‖g‖), is a *descent* direction on L_f of size
  β·sin/‖g_r‖: once the retain batch is fitted (‖g_r‖ → 0) it outweighs g_f and the
  "ascent" relearns the forget facts; and a raw-gradient move of fixed η either does nothing
  or runs away as ‖g_f‖ grows under ascent.
- ``"bounded"`` (default): the cosine of a vanishing gradient is ill-conditioned (exactly,
  not only in this approximation), so the retain gradient's direction is held fixed (no
  derivative through g_r), and H_f is replaced by ‖g_f‖²·I, which gives the cosine term the
  units and the scale of g_f:

      u = g_f − β‖g_f‖(ĝ_r − cos ĝ_f) = (1 + β cos) g_f − β(‖g_f‖/‖g_r‖) g_r.

  For every β ≥ 0 and cosine, ⟨u, g_f⟩ = ‖g_f‖² (always an ascent on L_f),
  ‖u‖ ≤ (1 + β)‖g_f‖ (bounded however small g_r is), and ⟨u, g_r⟩ = ‖g_f‖‖g_r‖(cos −
  β sin²): u lowers L_r to first order when cos < β sin², i.e. it removes the part of g_f
  that the retain facts share. Per tensor: the same on each tensor (no 1/P). The move is
  θ ← θ + η·sign(u), entry by entry: every entry moves by exactly η (the size of an Adam
  step at lr η, whatever the gradients' scale), with ⟨sign(u), u⟩ = ‖u‖₁ > 0. A move along
  u itself, normalised to RMS η, puts most of it on the few entries with the largest
  gradients (the embedding rows of the answer tokens) and cost fluency on SmolLM2-135M
  before it forgot (docs/method_measurements.md). With ``inner_lr=None`` (default) η is the
  optimizer's lr.

The outer step reuses the gradients of the last inner evaluation (computed at θ). Identity:
to first order ∇L_r(θ') = g_r + η H_r u + O(η²), and with H_r replaced by the identity

    d ≈ g_r + η u = η c_f g_f + (1 + η c_r) g_r,

exact when H_r = I and to O(η·‖H_r − I‖·‖u‖) otherwise. Bounded: d = g_r (the move's
correction H_r·η sign(u) is a Hessian product; replaced by the identity it would be a
fixed-size sign vector, which is not a retain direction, so it is left out).

So one step with T = 1 costs two gradient evaluations (g_f and g_r, one forward and backward
each, like ``grad_diff``), one Gram, and two combinations; each further inner step costs two
more evaluations. The last inner move is added after the optimizer's step: the outer
direction is computed at θ anyway, so the order shows only in a decoupled weight decay
(second order in η), and no copy of the parameters is needed to undo a failed step (T > 1
keeps one, for the earlier moves). The penalty ρ‖∇Φ‖² has no first-order counterpart (its
gradient 2ρ·H_Φ∇Φ is a Hessian product): first order requires ρ = 0. The per-objective
gradients are those of the unlearner (reduced across ranks), so this variant runs under
DDP and FSDP2 like every other method.

**Exact (``hvp="finite_difference"`` or ``"autograd"``)**: ``unlearnopt.methods.ofmu_exact``
computes H_f a, H_r b (and H_Φ∇Φ when ρ > 0) by central differences of gradients or by
double backward; single process only. Cost per ``step()`` in gradient evaluations (forward +
backward of one batch), ``finite_difference``: 6·T + 6 with β > 0 (T = 5: 36), plus 12 when
ρ > 0; 2·T + 6 with β = 0. GA is 1. Measured per ``step()`` against a GA step (CPU time,
one thread, the step benchmark's 2-layer Llama with 1.0 M parameters, 2 × 64 tokens per
batch, median of interleaved rounds): ``finite_difference`` with T = 5, ρ = 0: 39×; T = 1:
13×; earlier on the tiny test Llama (B = 4, T = 32) with ρ > 0: 40×, ``autograd``: 35×. First
order with T = 1 in the same run: 2.2× (``grad_diff`` 1.7×, ``mollm`` 2.2×); see
docs/method_measurements.md.

Defaults: ``hvp="first_order"`` with ``ascent="bounded"``, T = 1, β = 1 (the cosine is in
[−1, 1], commensurate with a token-mean loss), γ = 1.05, ``inner_lr=None`` (η = the
optimizer's lr) and ``rho = 0``. Measured on SmolLM2-135M (one PULSE request of ten facts,
AdamW lr 1e-5, 8 steps, seed 0; docs/method_measurements.md): η = lr forgets 6 of 10 and
keeps retain 1.00, neighbours 0.92 and perplexity +0.4%, as MOLLM does on the same request
(7 of 10, 1.00, 0.92, +1.0%); 2e-5 and 3e-5 forget 8 of 10 and lose neighbours (0.88, 0.79).
Over three seeds, one and five requests, pre-trained and fine-tuned facts, it does not meet
the bar in any run: it keeps every retain fact but forgets slowly (7-8 of 10 after 20 steps)
and, by the time it has forgotten, has lost neighbours (0.62-0.91 of before) or fluency (up
to +19%). The identity form does not meet the bar at any inner_lr tried, and normalising its
move to RMS η cost fluency (+8% at 3e-6 with 6 of 10 forgotten). The exact variants'
measured inner step is ``inner_lr = 3e-5`` (pass it), and ρ > 0 let the penalty's term
dominate the outer direction and cost retain accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from unlearnopt.aggregate import Aggregator
from unlearnopt.aggregate.combine import combine_gradients
from unlearnopt.aggregate.weighting import Weighting, WeightingResult
from unlearnopt.contract import Objective, ObjectiveContext, StepRecipe, StepTools
from unlearnopt.methods.base import Method
from unlearnopt.methods.hvp import HVP_MODES, global_norm
from unlearnopt.methods.ofmu_exact import OFMUEngine, batch_loss, cosine, cosine_directions
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import token_loss_of

__all__ = ["OFMU", "FirstOrderWeights", "OFMUEngine", "cosine", "cosine_directions"]

GRANULARITIES = ("global", "per_tensor")
HVP_CHOICES = ("first_order", *HVP_MODES)
ASCENTS = ("bounded", "identity")


class FirstOrderWeights(Weighting):
    """The Gram ``[B, 2, 2]`` of (g_f, g_r) -> first-order OFMU's coefficients.

    B = 1 (global cosine) or P (per-tensor cosines). :meth:`ascent` gives (c_f, c_r) of the
    inner direction u = c_f g_f + c_r g_r; calling the weighting gives the outer direction's
    coefficients: (η c_f, 1 + η c_r) for ``"identity"``, (0, 1) for ``"bounded"`` (module
    docstring).

    Args:
        beta: β ≥ 0.
        inner_lrs: η, one value for every tensor or one per trainable tensor (P values);
            0 when no inner step is taken (the outer direction is then g_r).
        ascent: ``"bounded"`` (the cosine's derivative through g_f only, scaled to ‖g_f‖)
            or ``"identity"`` (∇Φ with every Hessian replaced by the identity).
    """

    def __init__(self, beta: float, inner_lrs: Sequence[float], *, ascent: str = "identity"):
        if ascent not in ASCENTS:
            raise ValueError(f"ascent must be one of {ASCENTS}, got {ascent!r}")
        self.beta = float(beta)
        self.inner_lrs = [float(x) for x in inner_lrs]
        self.mode = ascent

    def ascent(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c [B, 2], cos 0-dim)``: u = c[:, 0] g_f + c[:, 1] g_r per problem, and the
        cosine (global, or the mean of the per-tensor ones)."""
        ff, rr, fr = gram[:, 0, 0], gram[:, 1, 1], gram[:, 0, 1]
        ok = (ff > 0) & (rr > 0)
        one, zero = torch.ones_like(ff), torch.zeros_like(ff)
        ff_s, rr_s = torch.where(ok, ff, one), torch.where(ok, rr, one)
        inv = torch.where(ok, (ff_s * rr_s).rsqrt(), zero)  # 1/(‖g_f‖‖g_r‖)
        cos = fr * inv
        if self.mode == "bounded":
            # u = g_f − β‖g_f‖(ĝ_r − cos ĝ_f) = (1 + β cos) g_f − β(‖g_f‖/‖g_r‖) g_r
            c_f = 1.0 + self.beta * cos
            c_r = torch.where(ok, -self.beta * (ff_s / rr_s).sqrt(), zero)
        else:
            scale = self.beta / gram.shape[0]
            c_f = 1.0 - scale * (inv - cos / ff_s)
            c_r = -scale * (inv - cos / rr_s)
        return torch.stack([c_f, c_r], dim=-1), cos.mean()

    def __call__(self, gram: torch.Tensor) -> WeightingResult:
        c, _ = self.ascent(gram)
        keep_retain = torch.tensor([0.0, 1.0], dtype=c.dtype, device=c.device)
        if self.mode == "bounded":
            outer = keep_retain.expand_as(c).clone()
        else:
            eta = torch.tensor(self.inner_lrs, dtype=c.dtype, device=c.device).unsqueeze(-1)
            outer = eta * c + keep_retain  # [B, 2], or [P, 2] for P values of η
        return WeightingResult(outer, outer, torch.ones_like(outer, dtype=torch.bool))


class OFMU(Method):
    """OFMU (arXiv 2509.22483), see the module docstring for the step.

    Options:
        beta: weight of the cosine penalty in Φ (≥ 0; 0 skips every Hessian product of the
            exact variants' inner steps). Default 1.0.
        rho: initial penalty ρ_0 of the outer objective (≥ 0; must be 0 with
            ``hvp="first_order"``). Default 0: the outer step is a plain step on the retain
            loss.
        gamma: growth factor, ρ ← γρ after every outer step (≥ 1). Default 1.05.
        inner_steps: T ≥ 0 inner ascent steps per ``step()``. Default 1.
        inner_lr: step size η of the inner ascent; None (default): each parameter group's
            current ``lr`` in the wrapped optimizer (so LR schedulers scale the inner moves
            too). The exact variants were measured at 3e-5.
        ascent: the first-order inner direction: ``"bounded"`` (default: the cosine's
            derivative through g_f only, scaled to ‖g_f‖; every entry moves by η along the
            sign) or ``"identity"`` (every Hessian replaced by the identity; moved as η·u).
        granularity: ``"global"`` (default) or ``"per_tensor"`` cosine.
        hvp: ``"first_order"`` (default: Hessians replaced by the identity, no Hessian
            product, DDP/FSDP2), ``"finite_difference"`` or ``"autograd"`` (the exact
            bi-level step; single process; autograd: reference-path losses and
            thrice-differentiable model ops).
        fd_eps: norm of the finite-difference perturbation. Default 1e-3 (float32); use
            ~1e-4 in float64.
    """

    name = "ofmu"
    defaults: ClassVar[Mapping[str, Any]] = {
        "beta": 1.0,
        "rho": 0.0,
        "gamma": 1.05,
        "inner_steps": 1,
        "inner_lr": None,
        "granularity": "global",
        "hvp": "first_order",
        "ascent": "bounded",
        "fd_eps": 1e-3,
    }
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
            raise ValueError(
                f"ofmu: beta and rho must be >= 0, got beta={c['beta']!r}, rho={c['rho']!r}"
            )
        if c["gamma"] < 1:
            raise ValueError(f"ofmu: gamma must be >= 1 (rho grows), got {c['gamma']!r}")
        if c["fd_eps"] <= 0:
            raise ValueError(f"ofmu: fd_eps must be > 0, got {c['fd_eps']!r}")
        t = c["inner_steps"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"ofmu: inner_steps must be an int >= 0, got {t!r}")
        lr = c["inner_lr"]
        if lr is not None and (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr < 0
        ):
            raise ValueError(f"ofmu: inner_lr must be None or a finite number >= 0, got {lr!r}")
        if c["granularity"] not in GRANULARITIES:
            raise ValueError(
                f"ofmu: granularity must be one of {GRANULARITIES}, got {c['granularity']!r}"
            )
        if c["ascent"] not in ASCENTS:
            raise ValueError(f"ofmu: ascent must be one of {ASCENTS}, got {c['ascent']!r}")
        if c["hvp"] not in HVP_CHOICES:
            raise ValueError(f"ofmu: hvp must be one of {HVP_CHOICES}, got {c['hvp']!r}")
        if c["hvp"] == "first_order" and c["rho"] != 0:
            raise ValueError(
                f"ofmu: rho={c['rho']!r} needs hvp='finite_difference' or "
                "'autograd' (the penalty's gradient 2ρ·H_Φ∇Φ is a Hessian "
                "product, which hvp='first_order' does not compute); use rho=0"
            )

    def objectives(self) -> list[Objective]:
        """L_f and L_r: the mean next-token NLL of the forget and of the retain batch
        (``hvp="autograd"``: on the plain-PyTorch reference path, which autograd can
        differentiate three times)."""
        backend = "reference" if self.config["hvp"] == "autograd" else None

        def nll(ctx: ObjectiveContext) -> torch.Tensor:
            return token_loss_of(ctx, "nll", backend=backend)

        return [Objective("forget_nll", "forget", nll), Objective("retain_nll", "retain", nll)]

    def aggregator(self) -> Aggregator:
        """The outer direction of the first-order step from the Gram of (g_f, g_r), with the
        inner step size of ``inner_lr`` (0 when None). ``backward()`` + ``step()`` applies
        this outer step alone: the inner move needs the batches (``step(forget, retain)``)."""
        c = self.config
        eta = 0.0 if c["inner_steps"] == 0 or c["inner_lr"] is None else c["inner_lr"]
        return Aggregator(self._weights([eta]), c["granularity"])

    def _weights(self, inner_lrs: Sequence[float]) -> FirstOrderWeights:
        c = self.config
        return FirstOrderWeights(c["beta"], inner_lrs, ascent=c["ascent"])

    @property
    def needs_retain(self) -> bool:
        return True

    def _inner_lrs(self, tools: StepTools) -> list[float]:
        if self.config["inner_lr"] is not None:
            return [float(self.config["inner_lr"])] * len(tools.params)
        return tools.learning_rates()

    def step_recipe(self) -> StepRecipe:
        return self._first_order_step if self.config["hvp"] == "first_order" else self._bilevel_step

    def _first_order_step(self, tools: StepTools, forget, retain) -> dict[str, float]:
        """T inner ascent moves along u = c_f g_f + c_r g_r (bounded: η·sign(u)) taken
        directly, one outer step through the optimizer along g_r (identity: η c_f g_f +
        (1 + η c_r) g_r) (module docstring); the last inner move and the outer step share one
        evaluation of g_f and g_r."""
        if tools.scaler is not None:
            raise NotImplementedError(
                "ofmu does not support a GradScaler (fp16 loss scaling); "
                "use bf16 autocast or float32"
            )
        c = self.config
        objectives = self.objectives()
        names = [o.name for o in objectives]
        steps = c["inner_steps"]
        lrs = self._inner_lrs(tools)
        weighting = self._weights([0.0] if steps == 0 else lrs if len(set(lrs)) > 1 else lrs[:1])
        aggregator = Aggregator(weighting, c["granularity"])

        def evaluate():
            losses, grads = tools.objective_gradients(objectives, forget, retain)
            gram = tools.gram(grads)
            problems = gram.total.unsqueeze(0) if c["granularity"] == "global" else gram.per_tensor
            ascent, cos = weighting.ascent(problems)
            return losses, grads, gram, ascent, cos

        def inner_move(grads, ascent) -> list[torch.Tensor | None]:
            """u, or sign(u) when bounded (each entry then moves by exactly η)."""
            u = combine_gradients(grads, ascent)
            if c["ascent"] == "bounded":
                u = [None if t is None else t.sign_() for t in u]
            return u

        with tools.atomic() as update:
            extra: dict[str, torch.Tensor] = {}
            for t in range(steps - 1):  # inner steps before the last evaluation
                losses, grads, _, ascent, _ = evaluate()
                if t == 0:
                    extra["loss/forget_nll_before_inner"] = losses["forget_nll"]
                update.move(inner_move(grads, ascent), alpha=lrs)
            losses, grads, gram, ascent, cos = evaluate()
            extra = {
                "ofmu/cos": cos,
                "ofmu/phi": losses["forget_nll"] - c["beta"] * cos,
                "ofmu/c_forget": ascent[:, 0].mean(),
                "ofmu/c_retain": ascent[:, 1].mean(),
                "grad_norm/phi": aggregator.direction_sq_norm(gram.per_tensor, ascent)
                .clamp(min=0)
                .sqrt(),
                **extra,
            }
            weighed = tools.weigh(aggregator, names, losses, grads, gram=gram, extra=extra)
            inner = inner_move(grads, ascent) if steps > 0 else None
            direction = aggregator.combine(grads, weighed.coefficients, inplace=True)
            # The last inner move follows the optimizer's step: the outer direction was
            # computed at θ already, so the order changes only a decoupled weight decay (by
            # lr·λ·η·u, second order), and a move after the step needs no parameter copy.
            if update.apply(direction, overflow=weighed.overflow) and inner is not None:
                update.move(inner, alpha=lrs)
        return self._finish(weighed.stats, update.stepped)

    def _finish(self, stats: dict[str, float], stepped: bool) -> dict[str, float]:
        """ρ's schedule after a step the optimizer took; the last stats."""
        if stepped:
            self.rho *= float(self.config["gamma"])
            self.outer_steps += 1
        stats["skipped"] = 0.0 if stepped else 1.0
        stats["ofmu/rho"] = self.rho
        return stats

    def _bilevel_step(self, tools: StepTools, forget, retain) -> dict[str, float]:
        """The exact step: T inner ascent steps on Φ moved directly, one outer step through
        the optimizer; all of it undone if the step fails."""
        c = self.config
        if tools.world_size > 1:
            raise NotImplementedError(
                f"ofmu with hvp={c['hvp']!r} runs in a single process "
                "(its Hessian products are not reduced across ranks); "
                "use hvp='first_order' under DDP or FSDP2"
            )
        if tools.scaler is not None:
            raise NotImplementedError(
                "ofmu does not support a GradScaler (fp16 loss scaling); "
                "use bf16 autocast or float32"
            )
        batches = {}
        for kind, batch in (("forget", forget), ("retain", retain)):
            if batch is None:
                raise ValueError(f"ofmu needs a {kind} batch, got None")
            batches[kind] = tools.micro_batches(batch, kind)
        forget_obj, retain_obj = self.objectives()
        engine = OFMUEngine(
            tools.params,
            batch_loss(tools, forget_obj, batches["forget"]),
            batch_loss(tools, retain_obj, batches["retain"]),
            beta=float(c["beta"]),
            granularity=c["granularity"],
            hvp=c["hvp"],
            fd_eps=float(c["fd_eps"]),
        )
        lrs = self._inner_lrs(tools)
        with tools.atomic() as update:
            first: dict[str, torch.Tensor] | None = None
            for _ in range(c["inner_steps"]):
                dphi, info = engine.ascent_direction()
                update.move(dphi, alpha=lrs)
                first = info if first is None else first
            direction, info = engine.outer_direction(self.rho)
            values = {
                "loss/forget_nll": info["loss_forget"],
                "loss/retain_nll": info["loss_retain"],
                "ofmu/cos": info["cos"],
                "ofmu/phi": info["phi"],
                "grad_norm/phi": info["grad_norm_phi"],
                "grad_norm/retain_nll": info["grad_norm_retain"],
            }
            if first is not None:
                values.update(
                    {
                        "loss/forget_nll_before_inner": first["loss_forget"],
                        "ofmu/phi_before_inner": first["phi"],
                        "ofmu/cos_before_inner": first["cos"],
                    }
                )
            values["grad_norm/direction"] = global_norm(direction)
            stats = tools.read_stats(values)  # the step's one host sync
            update.apply(direction)
        return self._finish(stats, update.stepped)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(rho=self.rho, outer_steps=self.outer_steps)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rho = float(state["rho"])
        self.outer_steps = int(state.get("outer_steps", 0))


register_method("ofmu", OFMU)
