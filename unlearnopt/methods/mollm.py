"""``mollm``: multi-objective LLM unlearning (Pan et al., 2024, arXiv 2412.20412).

Objectives (in this order):
    ``forget_uce``: mean over forget label tokens of -log(1 - alpha p(y)), the bounded
        *unlearning* cross-entropy (alpha = 1/2): its gradient vanishes as p(y) -> 0
        instead of exploding like GA's;
    ``retain_kl``: mean over retain label tokens of KL(p_ref || p_theta);
    ``retain_nll``: mean over retain label tokens of -log p(y).

Aggregation: MGDA on rescaled gradients (``MinNormWeights``):
    - an objective whose gradient norm is below ``sit_out`` (1e-3) x the largest sits out
      with weight 0 (at the first step theta = reference, so the KL gradient is rounding
      noise); ``step()`` reports ``sat_out/<name>`` (the fraction of problems it sat out);
    - ``normalize="mean"`` (default) rescales each active gradient to the mean norm of the
      active ones (``"unit"``: to norm 1; ``"none"``: as they are), so an objective that
      has converged (small gradient) does not take all the weight;
    - ``w`` = argmin over the simplex of ``||sum_i w_i ĝ_i||^2`` and the direction is
      ``d = sum_i w_i ĝ_i`` in the RESCALED gradients ĝ_i = s_i g_i, so
      ``<d, ĝ_i> >= ||d||^2`` for every active objective: a common descent direction (of
      the original objectives too, since ``<d, g_i> = <d, ĝ_i> ||g_i|| / ||ĝ_i|| > 0``).
      ``step()`` reports ``weight/<name>`` = w_i (not w_i times the rescaling);
    - ``granularity="global"`` solves one problem on the whole gradients,
      ``"per_tensor"`` one per parameter tensor (one batched ``min_norm`` call).
Options: ``alpha`` (0.5), ``normalize`` ("mean"), ``sit_out`` (1e-3), ``granularity``
("global"), ``solver`` (None = ``unlearnopt.ops.min_norm``; any
``gram [B, K, K] -> weights [B, K]``). Needs a reference model (for ``retain_kl``).

The defaults above meet the quality bar on SmolLM2-135M for one request and for fine-tuned
knowledge with AdamW lr 1e-5, clipping at 1.0 and each request stopped at its target; the
measurements are in docs/method_measurements.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from unlearnopt.aggregate import GRANULARITIES, NORMALIZE, Aggregator, MinNormWeights
from unlearnopt.contract import Objective
from unlearnopt.methods.base import Method
from unlearnopt.methods.ga_kl import retain_kl_objective
from unlearnopt.methods.grad_diff import retain_nll_objective
from unlearnopt.methods.registry import register_method
from unlearnopt.objectives import token_loss_of


class MOLLM(Method):
    """UCE on forget, KL and NLL on retain, combined by min-norm on rescaled gradients."""

    name = "mollm"
    defaults: ClassVar[Mapping[str, Any]] = {
        "alpha": 0.5,
        "normalize": "mean",
        "sit_out": 1e-3,
        "granularity": "global",
        "solver": None,
    }
    needs_ref = True

    def validate_config(self) -> None:
        c = self.config
        if not isinstance(c["alpha"], (int, float)) or not 0 < c["alpha"] <= 1:
            raise ValueError(f"alpha must be a number in (0, 1], got {c['alpha']!r}")
        if c["normalize"] not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {c['normalize']!r}")
        if c["granularity"] not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {c['granularity']!r}"
            )
        if not isinstance(c["sit_out"], (int, float)) or not 0 <= c["sit_out"] < 1:
            raise ValueError(f"sit_out must be a number in [0, 1), got {c['sit_out']!r}")
        if c["solver"] is not None and not callable(c["solver"]):
            raise TypeError(f"solver must be callable or None, got {c['solver']!r}")

    def objectives(self) -> list[Objective]:
        alpha = float(self.config["alpha"])
        return [
            Objective("forget_uce", "forget", lambda ctx: token_loss_of(ctx, "uce", alpha=alpha)),
            retain_kl_objective(),
            retain_nll_objective(),
        ]

    def aggregator(self) -> Aggregator:
        c = self.config
        return Aggregator(
            MinNormWeights(c["normalize"], c["sit_out"], c["solver"]), c["granularity"]
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["config"]["solver"] = None if self.config["solver"] is None else "custom"
        return state

    def load_state_dict(self, state) -> None:
        solver = self.config["solver"]
        super().load_state_dict(state)
        self.config["solver"] = solver  # a callable is not serialised; keep ours


register_method("mollm", MOLLM)
