"""``rmu``: Representation Misdirection for Unlearning (Li et al., 2024, "The WMDP Benchmark:
Measuring and Reducing Malicious Use With Unlearning", arXiv 2403.03218).

With h_l(x) ``[T, H]`` the hidden states after decoder layer l of the trained model, h_l^ref
the frozen reference's, u a fixed random unit vector (entries drawn from U[0, 1) with
``seed``, then normalised) and c the steering coefficient::

    forget_rmu = mean over the forget batch's tokens and the H dims of (h_l(x) - c u)^2
    retain_rmu = mean over the retain batch's tokens and the H dims of (h_l(x) - h_l^ref(x))^2
    d = g_forget_rmu + alpha * g_retain_rmu

Tokens: every position the attention mask keeps (the whole text, prompt included, as in the
paper). The per-element mean (squared norm / H) is the reduction of the paper's released code,
for which its c and alpha were tuned. Only decoder layers ``layer - depth + 1 .. layer``
learn: the forward stops after layer l and the input of the lowest updated layer is detached
(the paper updates the MLPs of those layers only; here the whole layers). The decoder layers
are found generically (``unlearnopt.unlearner.layers``), so any Hugging Face architecture works.

Defaults: the paper's Zephyr-7B setting, layer = 7, depth = 3 (layers 5, 6, 7),
steering_coeff = 6.5, alpha = 1200. They depend on the model: c should be a few times the
norm of the layer's activations; check both for a new model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.contract import Batch, Objective, ObjectiveContext
from unlearnopt.methods.base import Method
from unlearnopt.methods.grad_diff import check_weight
from unlearnopt.methods.registry import register_method


def _token_mask(batch: Batch) -> torch.Tensor:
    """``[B, T]`` bool: the positions the attention mask keeps (all when there is none)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(batch["labels"].shape, dtype=torch.bool, device=batch["labels"].device)
    return mask.bool()


def _tokens(batch: Batch) -> torch.Tensor:
    return _token_mask(batch).sum()


def steering_vector(hidden: int, seed: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """u ``[hidden]``: entries from U[0, 1) (CPU generator seeded with ``seed``), unit norm."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden, generator=gen, dtype=torch.float64)
    return (u / u.norm()).to(dtype=dtype, device=device)


def masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions and the H dims of ``(h - target)^2`` (at least float32
    math); ``h [B, T, H]``, ``target`` broadcastable to it, ``mask [B, T]``."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    sq = (h.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)  # [B, T]
    return (sq * mask).sum() / mask.sum().clamp(min=1)


class RMU(Method):
    """Steer layer ``layer`` to ``steering_coeff * u`` on forget, match the reference on retain."""

    name = "rmu"
    defaults: ClassVar[Mapping[str, Any]] = {
        "layer": 7,
        "depth": 3,
        "steering_coeff": 6.5,
        "alpha": 1200.0,
        "seed": 0,
    }
    needs_ref = True  # the retain term compares with the reference's hidden states

    def validate_config(self) -> None:
        c = self.config
        if not isinstance(c["layer"], int) or isinstance(c["layer"], bool) or c["layer"] < 0:
            raise ValueError(
                f"layer must be an int >= 0 (0 = the first decoder layer), got {c['layer']!r}"
            )
        if not isinstance(c["depth"], int) or not c["depth"] >= 1:
            raise ValueError(f"depth must be an int >= 1, got {c['depth']!r}")
        if c["depth"] > c["layer"] + 1:
            raise ValueError(f"depth={c['depth']} reaches below layer 0 from layer={c['layer']}")
        check_weight("steering_coeff", c["steering_coeff"])
        check_weight("alpha", c["alpha"])
        if not isinstance(c["seed"], int):
            raise TypeError(f"seed must be an int, got {c['seed']!r}")

    def _layers(self) -> tuple[int, int]:
        """(layer, the lowest updated layer)."""
        layer = self.config["layer"]
        return layer, layer - self.config["depth"] + 1

    def _forget(self, ctx: ObjectiveContext) -> torch.Tensor:
        layer, train_from = self._layers()
        h = ctx.hidden_at(layer, train_from)
        u = steering_vector(
            h.shape[-1],
            self.config["seed"],
            device=h.device,
            dtype=torch.promote_types(h.dtype, torch.float32),
        )
        return masked_mse(h, float(self.config["steering_coeff"]) * u, _token_mask(ctx.batch))

    def _retain(self, ctx: ObjectiveContext) -> torch.Tensor:
        layer, train_from = self._layers()
        h = ctx.hidden_at(layer, train_from)
        return masked_mse(h, ctx.ref_hidden_at(layer), _token_mask(ctx.batch))

    def objectives(self) -> list[Objective]:
        objs = [Objective("forget_rmu", "forget", self._forget, count=_tokens)]
        if float(self.config["alpha"]) > 0:
            objs.append(Objective("retain_rmu", "retain", self._retain, count=_tokens))
        return objs

    def aggregator(self) -> Aggregator:
        weights = [1.0]
        if float(self.config["alpha"]) > 0:
            weights.append(float(self.config["alpha"]))
        return Aggregator(FixedWeights(weights))


register_method("rmu", RMU)
