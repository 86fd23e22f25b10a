"""Unlearning with Hugging Face ``accelerate``.

``Accelerator.prepare`` wraps the model (DDP when distributed, device placement, autocast)
and the optimizer (``AcceleratedOptimizer``). The unlearner then wraps the *prepared*
optimizer's underlying torch optimizer: the ``AcceleratedOptimizer``'s own ``step()`` gates
on gradient-accumulation state and unscales fp16 gradients, and the unlearner does both
itself (its ``accumulate=`` option and ``scaler=``, to which the accelerator's GradScaler is
passed). LR schedulers prepared by the accelerator keep working (they hold the same
optimizer)::

    accelerator = Accelerator(cpu=True)
    unlearner, model, optimizer = prepare_unlearner(accelerator, model, optimizer,
                                                    method="grad_diff")
    for forget, retain in loader:
        stats = unlearner.step(forget=forget, retain=retain)

Autocast: ``prepare`` patches the model's forward with the accelerator's autocast, so the
unlearner's forward passes run in the chosen mixed precision.
"""

from __future__ import annotations

from typing import Any

import torch


def prepare_unlearner(
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Any = "mollm",
    ref_model: torch.nn.Module | None = None,
    **options: Any,
):
    """``accelerator.prepare(model, optimizer)`` and a ``MultiObjectiveUnlearner`` on them.

    Args:
        accelerator: an ``accelerate.Accelerator``.
        model, optimizer: the unprepared model and its torch optimizer.
        method: the unlearning method (name, class or instance).
        ref_model: the frozen original for methods that need one; moved to the
            accelerator's device (not prepared: it is never trained).
        **options: ``MultiObjectiveUnlearner`` and method options.

    Returns:
        ``(unlearner, prepared_model, prepared_optimizer)``.
    """
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    if "scaler" in options:
        raise TypeError("scaler is taken from the accelerator; do not pass it")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = getattr(optimizer, "optimizer", optimizer)
    scaler = getattr(accelerator, "scaler", None)
    if ref_model is not None:
        ref_model = ref_model.to(accelerator.device)
    unlearner = MultiObjectiveUnlearner(
        model, raw, method=method, ref_model=ref_model, scaler=scaler, **options
    )
    return unlearner, model, optimizer
