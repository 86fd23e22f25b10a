"""The unlearner's fused-linear forward passes: head inputs instead of logits, and the
reference's outputs cached per distinct forget batch.

:class:`HeadForwards` sits beside the plain forward passes (``forwards``: anything with
``model``, ``ref_model``, ``inputs(batch)`` and ``ref_forward(batch, kind)``) and gives the
objective contexts:

- ``head(batch, kind)``: the trained model's :class:`~unlearnopt.output_head.HeadInputs`
  (hidden states in the forward's graph), or None when the fused-linear path is off;
- ``ref_head(batch, kind)``: the reference's (no grad), or None;
- ``ref_sequence_log_prob(batch, kind)``: the reference's per-sequence log-probabilities
  ``[B]`` (NPO), from its head inputs or its logits;
- ``ref_logits(batch, kind)``: the reference's logits (the logits path).

The path is on unless ``enabled=False`` or a head cannot be fused (see
``unlearnopt.output_head``): then ONE warning names the reason and every context gets None,
so the objectives read the logits. The first call checks the reference too (when the
method needs one), so the path never mixes: either every objective reads head inputs or
none does. Reference outputs on *forget* batches go through a
:class:`~unlearnopt.unlearner.reference_cache.ReferenceCache` (forget batches usually repeat
at every
step of a request; retain batches usually change, so they are not kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from unlearnopt.objectives.fused_linear import sequence_log_prob_from_hidden
from unlearnopt.objectives.token import sequence_log_prob
from unlearnopt.output_head import (
    HeadInputs,
    HeadUnsupported,
    forward_head_inputs,
    unsupported_reason,
)
from unlearnopt.unlearner.distributed import unwrap
from unlearnopt.unlearner.forward import adapters_disabled
from unlearnopt.unlearner.reference_cache import ReferenceCache, module_fingerprint

Batch = Mapping[str, Any]
CACHED_KINDS = ("forget",)


def _peft_adapter_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters of a PEFT model's adapters (unused by its adapter-disabled reference)."""
    names = list(getattr(model, "peft_config", {}) or {})
    return [p for n, p in model.named_parameters() if any(f".{a}." in f".{n}." for a in names)]


class HeadForwards:
    """Head inputs of the trained model and of the reference (module docstring).

    Args:
        forwards: the plain forward passes (``model``, ``ref_model``, ``inputs(batch)``,
            ``ref_forward(batch, kind)``).
        enabled: False: the fused-linear path is off (no warning).
        needs_ref: whether the method reads the reference (then it is checked as well).
        cache: the reference cache (``ReferenceCache(enabled=False)`` to keep nothing).
        who: the name used in the warning.
    """

    def __init__(
        self,
        forwards: Any,
        *,
        enabled: bool = True,
        needs_ref: bool = False,
        cache: ReferenceCache | None = None,
        who: str = "MultiObjectiveUnlearner",
    ):
        if not isinstance(enabled, bool):
            raise TypeError(f"fused_linear must be a bool, got {type(enabled).__name__}")
        self.forwards = forwards
        self.needs_ref = needs_ref
        self.cache = cache if cache is not None else ReferenceCache()
        self.who = who
        self.active = enabled
        self.reason: str | None = None if enabled else "fused_linear=False"
        self._checked = False
        self._ref_fused = False  # the reference's head inputs were obtained once
        # The reference's head inputs computed by the first head() call (to check that the
        # reference can be fused too), handed to the first reader of the same batch.
        self._first_ref: tuple[Batch, HeadInputs] | None = None
        if enabled:
            reason = unsupported_reason(forwards.model)
            if reason is None and needs_ref and forwards.ref_model is not None:
                ref_reason = unsupported_reason(forwards.ref_model)
                reason = None if ref_reason is None else f"the reference model: {ref_reason}"
            if reason is not None:
                self._fall_back(reason)

    def _fall_back(self, reason: str) -> None:
        self.active = False
        self.reason = reason
        warnings.warn(
            f"{self.who}: the fused-linear path is off because {reason}; the "
            "objectives read the full [B, T, V] logits instead",
            RuntimeWarning,
            stacklevel=4,
        )

    # -- the trained model ----------------------------------------------------------------------
    def head(self, batch: Batch, kind: str = "batch") -> HeadInputs | None:
        """The trained model's head inputs on ``batch`` (in the graph), or None (path off)."""
        if not self.active:
            return None
        try:
            head = forward_head_inputs(self.forwards.model, self.forwards.inputs(batch))
        except HeadUnsupported as e:
            self._fall_back(e.reason)
            return None
        if not self._checked:
            # Try the reference once before any objective reads a head input (unless an
            # objective already read the reference's).
            if self.needs_ref and not self._ref_fused:
                try:
                    self._first_ref = (batch, self._ref_head_now(batch))
                except HeadUnsupported as e:
                    self._fall_back(f"the reference model: {e.reason}")
                    return None
            self._checked = True
        return head

    # -- the reference --------------------------------------------------------------------------
    def reference_state(self) -> tuple[int, int]:
        """What the reference's outputs depend on (changes when any of its tensors does)."""
        if self.forwards.ref_model is not None:
            return module_fingerprint(self.forwards.ref_model)
        model = unwrap(self.forwards.model)
        return module_fingerprint(model, skip=_peft_adapter_tensors(model))

    def _cached(self, batch: Batch, kind: str, what: str, compute: Callable[[], Any]) -> Any:
        if kind not in CACHED_KINDS:
            return compute()
        return self.cache.get(batch, what, self.reference_state(), compute)

    @torch.no_grad()
    def _ref_head_now(self, batch: Batch) -> HeadInputs:
        if self._first_ref is not None and self._first_ref[0] is batch:
            head, self._first_ref = self._first_ref[1], None
            return head
        inputs = self.forwards.inputs(batch)
        if self.forwards.ref_model is not None:
            head = forward_head_inputs(self.forwards.ref_model, inputs)
        else:
            with adapters_disabled(self.forwards.model) as model:
                head = forward_head_inputs(model, inputs)
        self._ref_fused = True
        return head

    def ref_head(self, batch: Batch, kind: str = "batch") -> HeadInputs | None:
        """The reference's head inputs (no grad; cached for forget batches), or None."""
        if not self.active:
            return None
        try:
            return self._cached(batch, kind, "head_inputs", lambda: self._ref_head_now(batch))
        except HeadUnsupported as e:
            self._fall_back(f"the reference model: {e.reason}")
            return None

    def ref_logits(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        """The reference's logits ``[B, T, V]`` (no grad; cached for forget batches)."""
        return self._cached(batch, kind, "logits", lambda: self.forwards.ref_forward(batch, kind))

    def ref_sequence_log_prob(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        """``log pi_ref(y_i | x_i)`` per sequence, ``[B]`` (no grad; cached for forget
        batches: B floats, whichever path computed them)."""

        @torch.no_grad()
        def compute() -> torch.Tensor:
            labels = batch["labels"]
            if self.active:
                try:
                    return sequence_log_prob_from_hidden(self._ref_head_now(batch), labels)
                except HeadUnsupported as e:
                    self._fall_back(f"the reference model: {e.reason}")
            return sequence_log_prob(self.forwards.ref_forward(batch, kind), labels)

        return self._cached(batch, kind, "sequence_log_prob", compute)

    def end_step(self) -> None:
        """Call once per step: drops the cached reference outputs the step did not read."""
        self._first_ref = None
        self.cache.end_step()
