"""``MultiObjectiveUnlearner``: unlearning methods behind an optimizer-style API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unlearnopt.contract import Batch, Grads, Objective
from unlearnopt.methods.base import Method
from unlearnopt.methods.registry import make_method
from unlearnopt.ops.grad_gram import GradGram
from unlearnopt.unlearner.atomic import trainable_params
from unlearnopt.unlearner.checks import (
    check_arguments,
    check_losses,
    check_params_in_model,
    check_ref_cache,
)
from unlearnopt.unlearner.distributed import Distributed
from unlearnopt.unlearner.engine import StepEngine, add_into
from unlearnopt.unlearner.forward import Forwards
from unlearnopt.unlearner.head_forward import HeadForwards
from unlearnopt.unlearner.pending import averaged_pending
from unlearnopt.unlearner.reference_cache import ReferenceCache


class MultiObjectiveUnlearner:
    """Wraps a torch optimizer and runs an unlearning method's step.

    Args:
        model: any module whose forward, called as ``model(**batch_without_labels)``, returns
            logits ``[B, T, V]`` (a tensor or an output with ``.logits``): Hugging Face causal
            LMs and LLaVA-style VLMs, PEFT models, DDP-wrapped or FSDP2-sharded models.
        optimizer: the user's optimizer (shared: its ``param_groups``, LR schedulers and
            ``zero_grad`` keep working). Only its parameters with ``requires_grad`` are
            updated and get per-objective gradients (so PEFT/LoRA only the adapters).
        method: a registered name (``"ga"``, ``"grad_diff"``, ``"ga_kl"``, ``"npo"``,
            ``"mollm"``, ``"siu"``, ``"ofmu"`` or one of yours), a ``Method`` subclass or
            instance.
        ref_model: the frozen original model for methods that need one (it is set to
            ``eval()`` and ``requires_grad_(False)``). ``None`` with a PEFT model: the
            reference is the same model with its adapters disabled (no second copy). Under
            DDP/FSDP2 it may be a plain local copy on every rank.
        max_grad_norm: clip the combined direction to this norm before the optimizer step.
        accumulate: split each batch into this many micro-batches (gradient accumulation;
            the result equals the big batch). A *list* of batch dicts is also accepted as
            ``forget`` / ``retain``.
        scaler: a ``torch.amp.GradScaler`` for fp16 autocast. The Gram is unscaled before
            the weights are chosen; an overflowing step is skipped as GradScaler does.
        fused_linear: True (default): the objectives never build ``[B, T, V]`` logits: the
            model (and the reference) run up to the output head's input, and the losses go
            through the fused-linear ops with the head's weight (``unlearnopt.output_head``;
            Llama, Qwen2, GPT-2's tied head, LLaVA, PEFT incl. LoRA on the head, DDP, a
            constant logit scale). A head that cannot be fused (soft-capping, FSDP2, ...)
            falls back to the logits with one warning naming the reason. False: the logits.
        ref_cache: True (default): the reference's outputs on a forget micro-batch are
            computed once per distinct batch content and reused while it repeats (the head
            inputs cost ``B * T * H`` elements per micro-batch, NPO's log-probabilities
            ``B`` floats, the logits path's reference logits ``B * T * V``; dropped after a
            step that does not read them). False: the reference runs at every step.
        **method_options: the method's options (e.g. ``normalize="unit"``, ``beta=0.1``).

    ``step(forget=, retain=)`` runs the method's step recipe, or the standard one (K
    gradients -> Gram -> aggregator -> one optimizer step; ``unlearnopt.unlearner.engine``),
    and returns its stats as floats (one host synchronisation per step). A failed step raises
    (``UnlearningStepError`` for non-finite values, ``ValueError`` / ``TypeError`` for
    malformed batches or models) BEFORE the wrapped optimizer's step: the parameters, the
    optimizer state and every ``p.grad`` are as they were. Mixed precision: run ``step()``
    inside ``torch.autocast(...)``; the forward passes inherit it. DDP and FSDP2: see
    ``unlearnopt.unlearner.distributed``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        method: str | Method | type[Method] = "mollm",
        ref_model: torch.nn.Module | None = None,
        *,
        max_grad_norm: float | None = None,
        accumulate: int = 1,
        scaler: torch.amp.GradScaler | None = None,
        fused_linear: bool = True,
        ref_cache: bool = True,
        **method_options: Any,
    ) -> None:
        check_arguments(model, optimizer, max_grad_norm, accumulate, scaler)
        self.model = model
        self.optimizer = optimizer
        self.method = make_method(method, **method_options)
        self.max_grad_norm = max_grad_norm
        self.accumulate = accumulate
        self.scaler = scaler
        self.params: list[torch.nn.Parameter] = trainable_params(optimizer)
        check_params_in_model(model, self.params)
        self.distributed = Distributed(model, self.params)
        self.forwards = Forwards(model, ref_model)
        self.forwards.check_reference(self.params, self.method.needs_ref, self.method.name)
        check_ref_cache(ref_cache)
        self.heads = HeadForwards(
            self.forwards,
            enabled=fused_linear,
            needs_ref=self.method.needs_ref,
            cache=ReferenceCache(enabled=ref_cache),
        )
        self.engine = StepEngine(
            self.params,
            optimizer,
            self.forwards,
            self.distributed,
            method_name=self.method.name,
            max_grad_norm=max_grad_norm,
            accumulate=accumulate,
            scaler=scaler,
            heads=self.heads,
        )
        self._pending: dict[str, list[torch.Tensor | None]] | None = None
        self._pending_losses: dict[str, torch.Tensor] = {}

    @property
    def ref_model(self) -> torch.nn.Module | None:
        return self.forwards.ref_model

    @property
    def steps(self) -> int:
        """Optimizer steps taken (a skipped step does not count)."""
        return self.engine.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.engine.steps = int(value)

    # -- the optimizer-like surface -------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending = None
        self._pending_losses = {}

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's, the method's (and the scaler's) state, and the step count."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "steps": self.steps,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("optimizer", "method"):
            if key not in state:
                raise ValueError(
                    f"state_dict lacks {key!r}; expected one from "
                    "MultiObjectiveUnlearner.state_dict()"
                )
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state.get("steps", 0))

    def no_sync(self):
        """DDP's ``no_sync()`` for a DDP model, else nothing. Run your own forward passes
        inside it when you use :meth:`backward` under DDP (the unlearner all-reduces)."""
        return self.distributed.no_sync()

    # -- the building blocks, for code that drives them itself ----------------------------------
    def forward(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        """The trained model's logits ``[B, T, V]`` on ``batch``."""
        return self.forwards.forward(batch, kind)

    def ref_forward(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        """The reference's logits ``[B, T, V]`` (no grad)."""
        return self.forwards.ref_forward(batch, kind)

    def micro_batches(self, batch: Any, name: str) -> list[Batch]:
        """Validate ``batch`` (a dict, or a list of dicts) and split it into micro-batches."""
        return self.engine.micro_batches(batch, name)

    def objective_gradients(
        self, objectives: Sequence[Objective], forget: Any, retain: Any
    ) -> tuple[dict[str, torch.Tensor], Grads]:
        """Losses and per-objective gradients, global means (``StepEngine``)."""
        return self.engine.objective_gradients(objectives, forget, retain)

    def gram(self, grads: Sequence[Sequence[torch.Tensor | None]]) -> GradGram:
        """The fp32 Gram of K gradients, unscaled by the GradScaler's scale."""
        return self.engine.gram(grads)

    def apply_direction(self, direction: Sequence[torch.Tensor | None]) -> bool:
        """Write ``direction`` into ``p.grad``, clip, and take the wrapped optimizer's step,
        atomically. Returns False if the GradScaler skipped the step."""
        with self.engine.atomic() as step:
            return step.apply(direction)

    # -- your own losses ------------------------------------------------------------------------
    def backward(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Per-objective gradients of your own losses (a dict name -> 0-dim tensor).

        One backward pass per loss (the graph is retained between them); the gradients add
        up over calls (accumulation) until :meth:`step` (with no batches) uses them. The
        names must be the method's objective names, or any names for an aggregator that does
        not depend on K (min-norm). Under DDP, run your forward passes inside
        :meth:`no_sync`; the gradients are averaged over ranks in :meth:`step` (under FSDP2
        by FSDP2's own reduce-scatter in each backward pass).
        """
        check_losses(losses, None if self._pending is None else list(self._pending))
        pending = self._pending if self._pending is not None else {}
        items = list(losses.items())
        new_grads = {}
        with self.engine.user_grads_kept(), self.distributed.backward_passes():
            for j, (name, loss) in enumerate(items):
                new_grads[name] = self.engine.backward(loss, j < len(items) - 1)
        for name, new in new_grads.items():
            add_into(pending.setdefault(name, [None] * len(self.params)), new)
            prev = self._pending_losses.get(name)
            value = losses[name].detach().float()
            self._pending_losses[name] = value if prev is None else prev + value
        self._pending = pending

    # -- the step -------------------------------------------------------------------------------
    def step(self, forget: Any = None, retain: Any = None) -> dict[str, float]:
        """One unlearning step; returns ``{"loss/<name>": .., "weight/<name>": ..,
        "grad_norm/<name>": .., "cos/<a>/<b>": .., "sat_out/<name>": .., "skipped": ..,
        "lr": ..}`` (floats).

        With no batches, uses the gradients accumulated by :meth:`backward`.
        """
        if forget is None and retain is None:
            if self._pending is None:
                raise ValueError(
                    "step() needs forget=/retain= batches, or backward(losses) called before it"
                )
            stats = self._step_pending()
        else:
            recipe = self.method.step_recipe()
            try:
                if recipe is None:
                    stats = self.engine.standard_step(
                        self.method.objectives(), self.method.aggregator(), forget, retain
                    )
                else:
                    stats = recipe(self.engine, forget, retain)
            finally:
                self.heads.end_step()
        stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return stats

    def _step_pending(self) -> dict[str, float]:
        assert self._pending is not None
        aggregator, names, losses, grads = averaged_pending(
            self.distributed, self.method, self._pending, self._pending_losses
        )
        self._pending, self._pending_losses = None, {}
        return self.engine.aggregate_and_step(aggregator, names, losses, grads)
