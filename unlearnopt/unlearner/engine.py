"""The step engine: per-objective gradients, the Gram, the checked weighing, the standard
step. It is the :class:`~unlearnopt.contract.StepTools` a method's own step recipe gets.

The standard step of a method with K objectives:

1. one forward pass per batch (forget, retain) and micro-batch, shared by the objectives
   that read it, up to the output head's input (the fused-linear path: the objectives
   compute the logits a chunk of tokens at a time; ``[B, T, V]`` logits only with
   ``fused_linear=False`` or a head that cannot be fused); the reference's (frozen copy,
   or the PEFT model with its adapters disabled) under ``torch.no_grad()``, once per
   distinct forget batch;
2. K backward passes, each objective's gradient kept for the trainable parameters of the
   wrapped optimizer only. **Memory: K gradient copies** (plus the one in ``p.grad``);
3. ``grad_gram`` once over the K gradients (``[P, K, K]`` and ``[K, K]``, fp32), the
   method's aggregator turns it into coefficients (min-norm batched over tensors for
   ``granularity="per_tensor"``), the combined direction is written into ``p.grad``;
4. one host synchronisation to check that every loss and the Gram are finite, then
   gradient clipping (``max_grad_norm``) and the wrapped optimizer's ``step()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from unlearnopt.aggregate import Aggregator
from unlearnopt.contract import BATCH_KINDS, Batch, Grads, Objective, ObjectiveContext, Weighed
from unlearnopt.ops.grad_gram import GradGram, grad_gram
from unlearnopt.unlearner import batches as batches_mod
from unlearnopt.unlearner.atomic import AtomicStep
from unlearnopt.unlearner.distributed import Distributed
from unlearnopt.unlearner.forward import Forwards
from unlearnopt.unlearner.head_forward import HeadForwards
from unlearnopt.unlearner.stats import read_stats, weighing_stats


class StepEngine:
    """The building blocks of a step over the trainable parameters ``params``.

    Args:
        params: the trainable parameters of ``optimizer``, in order.
        optimizer: the wrapped optimizer.
        forwards: the model's and the reference's forward passes.
        distributed: the DDP / FSDP2 plumbing.
        method_name: named in the errors about missing batches.
        max_grad_norm, accumulate, scaler: as in ``MultiObjectiveUnlearner``.
        heads: the fused-linear forward passes (head inputs instead of logits, the
            reference's outputs cached), or None for the logits only.

    Attributes:
        steps: optimizer steps taken (a skipped step does not count).
        labelled: the labelled tokens of each batch kind read by the last
            :meth:`objective_gradients` (all ranks), checked by the next :meth:`weigh`.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        forwards: Forwards,
        distributed: Distributed,
        *,
        method_name: str,
        max_grad_norm: float | None,
        accumulate: int,
        scaler: torch.amp.GradScaler | None,
        heads: HeadForwards | None = None,
    ):
        self.params = list(params)
        self.heads = heads
        self.optimizer = optimizer
        self.forwards = forwards
        self.distributed = distributed
        self.method_name = method_name
        self.max_grad_norm = max_grad_norm
        self.accumulate = accumulate
        self.scaler = scaler
        self.steps = 0
        self.labelled: dict[str, torch.Tensor] = {}

    # -- batches and forward passes -------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.distributed.world_size

    def micro_batches(self, batch: Any, kind: str) -> list[Batch]:
        return batches_mod.micro_batches(batch, kind, self.accumulate)

    def forward(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        return self.forwards.forward(batch, kind)

    def ref_forward(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        return self.forwards.ref_forward(batch, kind)

    def context(self, batch: Batch, kind: str) -> ObjectiveContext:
        """The objective context of one micro-batch: the forward passes it may call (head
        inputs on the fused-linear path, the reference's outputs through its cache)."""
        layers = self.forwards.layer_forward
        if self.heads is None:
            return ObjectiveContext(
                batch, kind, self.forward, self.ref_forward, layer_forward=layers
            )
        return ObjectiveContext(
            batch,
            kind,
            self.forward,
            self.heads.ref_logits,
            head_forward=self.heads.head,
            ref_head_forward=self.heads.ref_head,
            ref_log_prob_forward=self.heads.ref_sequence_log_prob,
            layer_forward=layers,
        )

    def learning_rates(self) -> list[float]:
        group_lr = {}
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
            for p in group["params"]:
                group_lr[id(p)] = lr
        return [group_lr[id(p)] for p in self.params]

    # -- gradients ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor | None]:
        """The gradient of ``loss`` (scaled by the GradScaler if any) for each parameter."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        return self.distributed.backward(loss, retain_graph)

    @contextlib.contextmanager
    def user_grads_kept(self) -> Iterator[None]:
        """Clear every ``p.grad`` for the block (backward passes accumulate into it) and put
        the user's values back afterwards."""
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g

    def objective_gradients(
        self, objectives: Sequence[Objective], forget: Any, retain: Any
    ) -> tuple[dict[str, torch.Tensor], Grads]:
        """Losses and gradients of ``objectives`` over the (micro-)batches, global means.

        Returns ``(losses, grads)``: ``losses[name]`` 0-dim float32 (the mean over the whole
        batch, all ranks), ``grads[i]`` the P gradients of objective i (``None`` where the
        objective does not reach a parameter), reduced across ranks, multiplied by the
        GradScaler's scale when there is one. Every ``p.grad`` is left as it was.
        """
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique, got {names}")
        batches: dict[str, list[Batch]] = {}
        for kind, batch in (("forget", forget), ("retain", retain)):
            if any(o.batch == kind for o in objectives):
                if batch is None:
                    raise ValueError(
                        f"method {self.method_name!r} needs a {kind} batch "
                        f"(objectives {[o.name for o in objectives if o.batch == kind]})"
                    )
                batches[kind] = self.micro_batches(batch, kind)

        # Each micro-batch's loss is weighted by its share of the units (tokens/sequences) of
        # the whole batch over all ranks, so the summed gradient is the global-batch mean's.
        counts = {o.name: [o.units(mb).float() for mb in batches[o.batch]] for o in objectives}
        totals = torch.stack([torch.stack(counts[n]).sum() for n in names])
        kinds = list(batches)
        labelled = torch.stack([batches_mod.labelled_tokens(batches[k]).to(totals) for k in kinds])
        if self.world_size > 1:  # one collective for both
            both = torch.cat([totals, labelled])
            torch.distributed.all_reduce(both)
            totals, labelled = both[: len(names)], both[len(names) :]
        self.labelled = dict(zip(kinds, labelled.unbind(0)))
        totals = totals.clamp(min=1)
        rank_factor = self.distributed.rank_factor

        losses = {n: torch.zeros((), dtype=torch.float32, device=totals.device) for n in names}
        grads: Grads = [[None] * len(self.params) for _ in objectives]
        index = {n: i for i, n in enumerate(names)}
        with self.user_grads_kept():
            with self.distributed.no_sync(), self.distributed.backward_passes():
                for kind in BATCH_KINDS:
                    objs = [o for o in objectives if o.batch == kind]
                    for m, mb in enumerate(batches.get(kind, [])):
                        ctx = self.context(mb, kind)
                        for j, obj in enumerate(objs):
                            i = index[obj.name]
                            loss = obj.loss(ctx)
                            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                                raise TypeError(
                                    f"objective {obj.name!r} must return a 0-dim "
                                    f"tensor, got {loss!r:.80}"
                                )
                            share = counts[obj.name][m].to(loss.device) / totals[i]
                            weighted = loss * share.to(loss.dtype)
                            losses[obj.name] = losses[obj.name] + weighted.detach().float()
                            if rank_factor != 1.0:
                                weighted = weighted * rank_factor
                            add_into(grads[i], self.backward(weighted, j < len(objs) - 1))
                        del ctx
            self.distributed.reduce(grads, losses)
        return losses, grads

    def gram(self, grads: Sequence[Sequence[torch.Tensor | None]]) -> GradGram:
        """``GradGram(per_tensor [P, K, K], total [K, K])`` fp32 of the K gradients, divided
        by the GradScaler's scale squared when there is one (the scale is a power of two, so
        this unscaling is exact)."""
        gram = grad_gram(grads)
        if self.scaler is not None and self.scaler.is_enabled():
            # The public way to read the scale without a host sync: scale a one.
            scale = self.scaler.scale(torch.ones((), device=gram.total.device, dtype=torch.float32))
            inv = 1.0 / scale
            gram = type(gram)(gram.per_tensor * inv * inv, gram.total * inv * inv)
        return gram

    # -- weighing and stepping ------------------------------------------------------------------
    def weigh(
        self,
        aggregator: Aggregator,
        names: Sequence[str],
        losses: Mapping[str, torch.Tensor],
        grads: Grads,
        *,
        gram: GradGram | None = None,
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> Weighed:
        """Gram -> coefficients -> checked stats (one host sync); see ``weighing_stats``.
        Also raises ``ValueError`` if a batch read by the last :meth:`objective_gradients`
        had no labelled token (every objective's mean would be over nothing)."""
        gram = self.gram(grads) if gram is None else gram
        result = aggregator.coefficients(gram.per_tensor, gram.total)
        dsq = aggregator.direction_sq_norm(gram.per_tensor, result.coefficients)
        labelled, self.labelled = self.labelled, {}
        stats, overflow = weighing_stats(
            names,
            losses,
            gram,
            result,
            dsq,
            scaled=self.scaler is not None,
            extra=extra,
            labelled=labelled,
        )
        return Weighed(stats, result.coefficients, overflow)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[AtomicStep]:
        """An all-or-nothing update; counts the step when the optimizer took it."""
        with AtomicStep(
            self.params, self.optimizer, max_grad_norm=self.max_grad_norm, scaler=self.scaler
        ) as step:
            yield step
        if step.stepped:
            self.steps += 1

    @staticmethod
    def read_stats(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return read_stats(values)

    def aggregate_and_step(
        self,
        aggregator: Aggregator,
        names: Sequence[str],
        losses: Mapping[str, torch.Tensor],
        grads: Grads,
    ) -> dict[str, float]:
        """Gram -> coefficients -> checks -> combined direction -> optimizer step; stats."""
        with self.atomic() as step:
            weighed = self.weigh(aggregator, names, losses, grads)
            direction = aggregator.combine(grads, weighed.coefficients, inplace=True)
            step.apply(direction, overflow=weighed.overflow)
        stats = weighed.stats
        stats["skipped"] = 0.0 if step.stepped else 1.0
        return stats

    def standard_step(
        self, objectives: Sequence[Objective], aggregator: Aggregator, forget: Any, retain: Any
    ) -> dict[str, float]:
        """The generic step: K gradients -> Gram -> aggregator -> optimizer step."""
        losses, grads = self.objective_gradients(objectives, forget, retain)
        return self.aggregate_and_step(aggregator, [o.name for o in objectives], losses, grads)


def add_into(acc: list[torch.Tensor | None], new: Sequence[torch.Tensor | None]) -> None:
    """``acc[q] += new[q]`` where present (the first one is taken as is)."""
    for q, g in enumerate(new):
        if g is None:
            continue
        if acc[q] is None:
            acc[q] = g
        else:
            acc[q].add_(g)
