"""One decoder layer's hidden states, for any Hugging Face architecture.

The decoder layers are found generically: of the ``torch.nn.ModuleList`` s whose entries all
have the same class (the repeated blocks), the one holding the most parameters (so a
multimodal model's language layers win over its vision tower's). Layer ``l``'s output is read
with a forward hook that also stops the forward there (the layers above are never run); when
only layers ``train_from .. l`` should learn, a second hook detaches the input of layer
``train_from``, so no gradient reaches the layers (or embeddings) below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class _ReachedLayer(Exception):
    """Raised by the hook to stop the forward pass once the wanted layer has run."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's repeated decoder blocks (see the module docstring).

    Raises:
        ValueError: when the model has no ModuleList of same-class blocks.
    """
    best, best_size = None, -1
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = module, size
    if best is None:
        raise ValueError(
            f"found no decoder layers in {type(model).__name__}: expected a "
            "torch.nn.ModuleList of same-class blocks (e.g. model.layers)"
        )
    return best


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _detach_input(module, args, kwargs):
    """Forward pre-hook: the block's hidden-states input (first positional argument, or the
    ``hidden_states`` keyword) detached."""
    if args:
        return (args[0].detach(), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
    raise ValueError(f"cannot find the hidden-states input of {type(module).__name__}")


def layer_output(
    run: Callable[[], Any], model: torch.nn.Module, layer: int, train_from: int | None = None
) -> torch.Tensor:
    """Hidden states ``[B, T, H]`` after decoder layer ``layer`` (0-based; negative counts from
    the end) while ``run()`` calls the model's forward.

    Args:
        run: calls the model once (its result is not used).
        model: the module whose decoder layers are hooked.
        layer: which layer's output.
        train_from: when given, the input of layer ``train_from`` is detached, so only layers
            ``train_from .. layer`` (and nothing below, embeddings included) receive a
            gradient; None: everything below ``layer`` may receive one.
    """
    layers = decoder_layers(model)
    n = len(layers)
    if not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(
            f"layer must be an int in [-{n}, {n}) for a model with {n} decoder "
            f"layers, got {layer!r}"
        )
    layer %= n
    if train_from is not None and (not isinstance(train_from, int) or not 0 <= train_from <= layer):
        raise ValueError(f"train_from must be an int in [0, layer={layer}], got {train_from!r}")
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        captured.append(_first(output))
        raise _ReachedLayer

    handles = [layers[layer].register_forward_hook(capture)]
    if train_from is not None:
        handles.append(
            layers[train_from].register_forward_pre_hook(_detach_input, with_kwargs=True)
        )
    try:
        run()
    except _ReachedLayer:
        pass
    finally:
        for h in handles:
            h.remove()
    if not captured:
        raise ValueError(
            f"decoder layer {layer} of {type(model).__name__} did not run in the forward pass"
        )
    return captured[0]
