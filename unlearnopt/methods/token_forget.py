"""Methods with one reweighted token objective on forget and NLL on retain: ``wga``,
``satimp``, ``ce_u``, ``undial``.

Each has objectives ``forget_<name>`` (mean over forget label tokens, formulas in
``unlearnopt.objectives.weighted_token``; ``wga``, ``satimp`` and ``ce_u`` through the fused
unlearning cross-entropy, from the output head's inputs when the unlearner runs the
fused-linear path, so they never build ``[B, T, V]`` logits there) and, when
``retain_weight > 0``, ``retain_nll``
(mean -log p(y) over retain label tokens), combined as the weighted sum
``d = forget_weight * g_forget + retain_weight * g_retain_nll``.

- ``wga`` (Wang et al., ICLR 2025): ``p_y**beta * log p_y``; beta = 1, forget_weight = 1,
  retain_weight = 1 (open-unlearning's WGA defaults; the paper's retain term is NLL).
- ``satimp`` (Yang et al., ICML 2025): ``p_y**beta1 (1 - p_y)**beta2 * log p_y``;
  beta1 = 5, beta2 = 1, forget_weight = 0.1, retain_weight = 1 (open-unlearning's defaults).
- ``ce_u`` (Yang et al., 2025, arXiv 2503.01224): cross-entropy against the prediction with
  the label removed; forget_weight = 1, retain_weight = 1 (the paper adds the retain NLL).
- ``undial`` (Dong et al., 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
  Unlearning in Large Language Models", arXiv 2402.10052): cross-entropy
  ``-sum_v q_v log p_v`` against ``q = softmax(z_ref - gamma e_y)``, the reference's
  distribution with the label logit lowered by gamma; gamma = 10, forget_weight = 1,
  retain_weight = 0 (open-unlearning's defaults: pure self-distillation). Needs a reference.
  Runs on the fused masked KL; on the fused-linear path neither the model's nor the
  reference's ``[B, T, V]`` logits are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from unlearnopt.aggregate import Aggregator
from unlearnopt.contract import Objective, ObjectiveContext
from unlearnopt.methods.base import Method
from unlearnopt.methods.grad_diff import (
    check_weight,
    forget_retain_aggregator,
    with_retain_nll,
)
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import ce_u_loss_of, satimp_loss_of, undial_loss_of, wga_loss_of


class _TokenForgetMethod(Method):
    """A forget token objective (``forget_loss``) + optional retain NLL, weighted sum."""

    #: the hyper-parameters passed to the forget loss (besides the two weights)
    loss_options: ClassVar[tuple[str, ...]] = ()

    def validate_config(self) -> None:
        check_weight("forget_weight", self.config["forget_weight"])
        check_weight("retain_weight", self.config["retain_weight"])
        for key in self.loss_options:
            check_weight(key, self.config[key])

    def forget_loss(self, ctx: ObjectiveContext, **options: float) -> Any:
        raise NotImplementedError

    def objectives(self) -> list[Objective]:
        options = {k: float(self.config[k]) for k in self.loss_options}

        def loss(ctx: ObjectiveContext) -> Any:
            return self.forget_loss(ctx, **options)

        forget = Objective(f"forget_{self.name}", "forget", loss)
        return with_retain_nll(forget, self.config["retain_weight"])

    def aggregator(self) -> Aggregator:
        return forget_retain_aggregator(self.config["forget_weight"], self.config["retain_weight"])


class WGA(_TokenForgetMethod):
    """Weighted gradient ascent: ``p_y**beta * log p_y`` (beta = 1) + retain NLL (1)."""

    name = "wga"
    defaults: ClassVar[Mapping[str, Any]] = {
        "beta": 1.0,
        "forget_weight": 1.0,
        "retain_weight": 1.0,
    }
    loss_options = ("beta",)

    def forget_loss(self, ctx, beta):
        return wga_loss_of(ctx, beta)


class SatImp(_TokenForgetMethod):
    """``p_y**beta1 (1-p_y)**beta2 * log p_y`` (5, 1), weight 0.1, + retain NLL (1)."""

    name = "satimp"
    defaults: ClassVar[Mapping[str, Any]] = {
        "beta1": 5.0,
        "beta2": 1.0,
        "forget_weight": 0.1,
        "retain_weight": 1.0,
    }
    loss_options = ("beta1", "beta2")

    def forget_loss(self, ctx, beta1, beta2):
        return satimp_loss_of(ctx, beta1, beta2)


class CEU(_TokenForgetMethod):
    """Cross-entropy against softmax(z with z_y = -inf) + retain NLL (1)."""

    name = "ce_u"
    defaults: ClassVar[Mapping[str, Any]] = {"forget_weight": 1.0, "retain_weight": 1.0}

    def forget_loss(self, ctx):
        return ce_u_loss_of(ctx)


class UNDIAL(_TokenForgetMethod):
    """Cross-entropy against softmax(z_ref - gamma e_y) (gamma = 10); no retain term."""

    name = "undial"
    defaults: ClassVar[Mapping[str, Any]] = {
        "gamma": 10.0,
        "forget_weight": 1.0,
        "retain_weight": 0.0,
    }
    needs_ref = True
    loss_options = ("gamma",)

    def forget_loss(self, ctx, gamma):
        return undial_loss_of(ctx, gamma)


for _cls in (WGA, SatImp, CEU, UNDIAL):
    register_method(_cls.name, _cls)
