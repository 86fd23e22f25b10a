"""The step's inputs from the gradients accumulated by ``MultiObjectiveUnlearner.backward()``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from unlearnopt.aggregate import FixedWeights
from unlearnopt.methods.base import Method
from unlearnopt.unlearner.distributed import Distributed


def averaged_pending(
    distributed: Distributed,
    method: Method,
    pending: Mapping[str, list[torch.Tensor | None]],
    pending_losses: Mapping[str, torch.Tensor],
) -> tuple[Any, list[str], dict[str, torch.Tensor], list[list[torch.Tensor | None]]]:
    """The method's aggregator, the objective names (in the method's order when they are its
    own), and the pending losses and gradients averaged over ranks: the arguments of
    ``StepEngine.aggregate_and_step``."""
    names = list(pending)
    own = [o.name for o in method.objectives()]
    aggregator = method.aggregator()
    if set(names) == set(own):
        names = own
    elif isinstance(aggregator.weighting, FixedWeights):
        raise ValueError(
            f"backward() got losses {names} but method {method.name!r} "
            f"weights the objectives {own}; use those names"
        )
    grads = [pending[n] for n in names]
    losses = {n: pending_losses[n] for n in names}
    world = distributed.world_size
    if world > 1 and distributed.fsdp:
        # FSDP2's reduce-scatter already averaged the gradients over ranks.
        distributed.all_reduce_losses(losses)
        losses = {n: v / world for n, v in losses.items()}
    elif world > 1:
        distributed.all_reduce(grads, losses)
        for per in grads:
            for g in per:
                if g is not None:
                    g.div_(world)
        losses = {n: v / world for n, v in losses.items()}
    return aggregator, names, losses, grads
