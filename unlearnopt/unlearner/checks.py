"""The ``MultiObjectiveUnlearner`` constructor's and ``backward()``'s argument checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def check_arguments(
    model: Any, optimizer: Any, max_grad_norm: Any, accumulate: Any, scaler: Any
) -> None:
    """Raise ``TypeError`` / ``ValueError`` for a malformed constructor argument."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if max_grad_norm is not None and (
        not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0
    ):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive int, got {accumulate!r}")
    if scaler is not None and not hasattr(scaler, "unscale_"):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


def check_params_in_model(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
    """Raise ``ValueError`` if one of the optimizer's trainable parameters is not ``model``'s."""
    ids = {id(p) for p in model.parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in ids]
    if missing:
        raise ValueError(
            f"the optimizer's trainable parameters {missing[:5]} are not parameters of model"
        )


def check_ref_cache(ref_cache: Any) -> None:
    if not isinstance(ref_cache, bool):
        raise TypeError(f"ref_cache must be a bool, got {type(ref_cache).__name__}")


def check_losses(losses: Any, pending_names: Sequence[str] | None) -> None:
    """``backward()``'s losses: a non-empty dict of 0-dim tensors, named as the pending ones."""
    if not isinstance(losses, Mapping) or not losses:
        raise TypeError("losses must be a non-empty dict of name -> 0-dim tensor")
    for name, loss in losses.items():
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"losses[{name!r}] must be a 0-dim tensor, got {loss!r:.80}")
    if pending_names is not None and list(pending_names) != list(losses):
        raise ValueError(
            f"backward() got losses {list(losses)} but earlier calls since the "
            f"last step had {list(pending_names)}"
        )
