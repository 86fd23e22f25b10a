"""DDP and FSDP2 plumbing of the per-objective backward passes.

DDP: the per-objective backward passes run under ``no_sync()`` (DDP's reducer allows one
backward per forward; several backward passes of one forward would trip it) and each
objective's gradient is then all-reduced here (SUM of gradients already weighted by each
rank's share of the global token/sequence count), so before the Gram every rank holds
exactly the gradient of the global-batch mean, as one process on the concatenated batch
would. That is K all-reduces of the gradient size per step, what DDP itself would spend on
K synchronised backward passes; the Gram, the weights and the direction are then computed
redundantly (and identically) on every rank, so no statistic is gathered.

FSDP2 (``fully_shard``): parameters and gradients are sharded DTensors. Each objective's
backward runs with gradient sync on, so FSDP2's post-backward reduce-scatter hands back the
objective's gradient already reduced and sharded (no separate all-reduce, nothing gathered);
FSDP2 averages over ranks, so the loss is multiplied by the world size before its backward
(:attr:`Distributed.rank_factor`; each rank's part is weighted by its global share, as under
DDP, and the SUM is wanted). Several backward passes run through one forward, so the
unsharded parameters must outlive the first: ``reshard_after_backward`` is switched off
during the step's backward passes and the model resharded after them. The Gram runs on the
local shards (``grad_gram`` all-reduces only ``[P, K, K]``), the weighted combination is
DTensor arithmetic, the optimizer steps the sharded parameters. Other trainable parameters
of the model that the optimizer does not hold also receive (unused) gradients under FSDP2,
since backward cannot be restricted to the sharded parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from unlearnopt.contract import Grads


def is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return model.module if is_ddp(model) else model


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 (``fully_shard``) modules of ``model``, outermost first; [] without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _pack_losses(losses: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    names = list(losses)
    return names, torch.stack([losses[n] for n in names])


class Distributed:
    """How the trained model is distributed (DDP, FSDP2 or a single process), and the
    collectives of a step.

    Args:
        model: the trained model.
        params: the trainable parameters of the wrapped optimizer.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter]):
        self.model = model
        self.params = list(params)
        self.ddp = is_ddp(model)
        self.fsdp = fsdp_modules(model)
        if not self.fsdp and any(
            type(p).__name__ == "DTensor" or hasattr(p, "device_mesh") for p in self.params
        ):
            raise NotImplementedError(
                "DTensor parameters outside FSDP2 (fully_shard), e.g. "
                "tensor parallelism, are not supported by "
                "MultiObjectiveUnlearner; use DDP or fully_shard"
            )

    @property
    def world_size(self) -> int:
        if (self.ddp or self.fsdp) and dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    @property
    def rank_factor(self) -> float:
        """What each loss is multiplied by before its backward: FSDP2's reduce-scatter
        averages over ranks and the weighted parts must be SUMmed."""
        return float(self.world_size) if self.fsdp else 1.0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """DDP's ``no_sync()`` for a DDP model, else nothing."""
        if self.ddp:
            with self.model.no_sync():
                yield
        else:
            yield

    @contextlib.contextmanager
    def backward_passes(self) -> Iterator[None]:
        """FSDP2: keep the unsharded parameters across the several backward passes of one
        forward (each pass needs them), reshard once at the end. Nothing without FSDP2."""
        if not self.fsdp:
            yield
            return
        groups = [g for m in self.fsdp for g in m._get_fsdp_state()._fsdp_param_groups]
        before = [g.reshard_after_backward for g in groups]
        for m in self.fsdp:
            m.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for g, flag in zip(groups, before):
                g.reshard_after_backward = flag
            for m in self.fsdp:
                m.reshard()

    def backward(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor | None]:
        """Backward of ``loss`` into the trainable parameters; returns and clears their
        ``.grad`` (the caller saves and restores the user's ``p.grad``)."""
        if self.fsdp:
            # The sharded parameters are not leaves of the forward's graph (FSDP2 all-gathers
            # them into unsharded ones and reduce-scatters into their .grad), so no inputs=.
            loss.backward(retain_graph=retain_graph)
        else:
            loss.backward(retain_graph=retain_graph, inputs=self.params)
        grads = []
        for p in self.params:
            grads.append(p.grad)
            p.grad = None
        return grads

    def reduce(self, grads: Grads, losses: dict[str, torch.Tensor]) -> None:
        """SUM the losses (and under DDP the gradients) of a step across ranks, in place;
        nothing in a single process. Under FSDP2 the gradients were reduced by FSDP2."""
        if self.world_size == 1:
            return
        if self.fsdp:
            self.all_reduce_losses(losses)
        else:
            self.all_reduce(grads, losses)

    def all_reduce(self, grads: Grads, losses: dict[str, torch.Tensor]) -> None:
        """SUM across ranks (each rank's part is already weighted by its global share).

        A parameter some rank did not reach is zeros there: every rank must call the same
        collectives, so a None gradient is materialised as zeros where any rank has one.
        """
        presence = torch.tensor(
            [[g is not None for g in per] for per in grads],
            dtype=torch.int32,
            device=self.params[0].device,
        )
        dist.all_reduce(presence, op=dist.ReduceOp.MAX)
        flags = presence.tolist()
        works = []
        for i, per in enumerate(grads):
            for q, p in enumerate(self.params):
                if flags[i][q]:
                    if per[q] is None:
                        per[q] = torch.zeros_like(p)
                    works.append(dist.all_reduce(per[q], async_op=True))
        names, packed = _pack_losses(losses)
        works.append(dist.all_reduce(packed, async_op=True))
        for w in works:
            w.wait()
        for n, v in zip(names, packed.unbind(0)):
            losses[n] = v

    @staticmethod
    def all_reduce_losses(losses: dict[str, torch.Tensor]) -> None:
        """SUM of the losses across ranks (FSDP2: the gradients are reduced by FSDP2)."""
        names, packed = _pack_losses(losses)
        dist.all_reduce(packed)
        for n, v in zip(names, packed.unbind(0)):
            losses[n] = v
