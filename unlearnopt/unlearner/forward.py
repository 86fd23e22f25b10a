"""Forward passes of the trained model and of the reference (a frozen copy, or the PEFT
model with its adapters disabled)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from unlearnopt.contract import AUX_PREFIX, Batch
from unlearnopt.unlearner.distributed import unwrap
from unlearnopt.unlearner.layers import layer_output


def extract_logits(output: Any, who: str) -> torch.Tensor:
    """The ``[B, T, V]`` logits of a forward's output (a tensor, a dict or an output object
    with ``.logits``)."""
    logits = None
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif getattr(output, "logits", None) is not None:
        logits = output.logits
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{who}'s forward returned {type(output).__name__} without logits; "
            "expected a tensor [B, T, V] or an output with a .logits tensor"
        )
    if logits.dim() != 3:
        raise ValueError(f"{who}'s logits must be [B, T, V], got shape {tuple(logits.shape)}")
    return logits


def vocabulary_size(model: torch.nn.Module) -> int | None:
    """The number of logits per position ``model`` produces, read from its output embedding
    (Hugging Face ``get_output_embeddings()``) or its config's ``vocab_size`` (also a
    multimodal config's ``text_config``); None when the model does not say."""
    model = unwrap(model)
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:  # a DTensor: global shape
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        size = getattr(cfg, "vocab_size", None)
        if isinstance(size, int):
            return size
    return None


def _takes_use_cache(model: torch.nn.Module) -> bool:
    """Whether ``use_cache=False`` may be passed: the forward names it, or forwards **kwargs
    of a model whose config has ``use_cache`` (PEFT wrappers). Plain modules never receive
    an unexpected keyword."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    forwards_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    has_flag = hasattr(getattr(model, "config", None), "use_cache")
    return "use_cache" in params or (forwards_kwargs and has_flag)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A PEFT model as its own reference: adapters disabled and every module in eval mode
    (no dropout); yields the unwrapped model and restores both afterwards."""
    model = unwrap(model)
    if not hasattr(model, "disable_adapter"):
        raise ValueError("no reference: pass ref_model= or use a PEFT model")
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        with model.disable_adapter():
            yield model
    finally:
        for m in training:
            m.training = True


class Forwards:
    """The two forward passes of a step.

    Args:
        model: the trained model (possibly DDP-wrapped); ``model(**batch_without_labels)``
            returns logits ``[B, T, V]`` (a tensor or an output with ``.logits``).
        ref_model: the frozen original, or None (then a PEFT model's adapters are disabled
            for the reference).
    """

    def __init__(self, model: torch.nn.Module, ref_model: torch.nn.Module | None):
        self.model = model
        self.ref_model = ref_model
        # use_cache=False: no KV cache is built during training forwards.
        self._use_cache_kw = _takes_use_cache(unwrap(model))

    @property
    def has_peft_reference(self) -> bool:
        return hasattr(unwrap(self.model), "disable_adapter")

    def check_reference(
        self, trained: Sequence[torch.nn.Parameter], needs_ref: bool, method_name: str
    ) -> None:
        """Validate and freeze ``ref_model`` (eval mode, no grad); raise if the method needs
        a reference and there is none."""
        if self.ref_model is not None:
            if not isinstance(self.ref_model, torch.nn.Module):
                raise TypeError(
                    f"ref_model must be a torch.nn.Module, got {type(self.ref_model).__name__}"
                )
            ids = {id(p) for p in trained}
            if any(id(p) in ids for p in self.ref_model.parameters()):
                raise ValueError(
                    "ref_model shares parameters with the trained model; pass a "
                    "frozen copy (copy.deepcopy(model)) or, for PEFT, no ref_model"
                )
            mine, theirs = vocabulary_size(self.model), vocabulary_size(self.ref_model)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"ref_model has a vocabulary of {theirs} tokens but model has "
                    f"{mine}; the reference must be a copy of the original model "
                    "(same tokenizer and output layer)"
                )
            self.ref_model.requires_grad_(False)
            self.ref_model.eval()
        elif needs_ref and not self.has_peft_reference:
            raise ValueError(
                f"method {method_name!r} needs a reference model: pass "
                "ref_model= (a frozen copy of the original model), or use a PEFT "
                "model, whose adapters are disabled for the reference"
            )

    def inputs(self, batch: Batch) -> dict[str, Any]:
        """The model's keyword inputs: the batch without ``labels`` (so the model computes no
        loss of its own) and without the auxiliary ``aux_*`` entries."""
        inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith(AUX_PREFIX)}
        if self._use_cache_kw:
            inputs.setdefault("use_cache", False)
        return inputs

    def forward(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        """The trained model's logits ``[B, T, V]`` on ``batch``."""
        return extract_logits(self.model(**self.inputs(batch)), "model")

    def layer_forward(
        self,
        batch: Batch,
        kind: str,
        layer: int,
        train_from: int | None = None,
        reference: bool = False,
    ) -> torch.Tensor:
        """Hidden states ``[B, T, H]`` after decoder layer ``layer`` of the trained model
        (gradient only into layers ``train_from .. layer`` when ``train_from`` is given) or,
        with ``reference=True``, of the reference (no grad)."""
        inputs = self.inputs(batch)
        if not reference:
            return layer_output(lambda: self.model(**inputs), unwrap(self.model), layer, train_from)
        with torch.no_grad():
            if self.ref_model is not None:
                return layer_output(
                    lambda: self.ref_model(**inputs), self.ref_model, layer
                ).detach()
            with adapters_disabled(self.model) as model:
                return layer_output(lambda: model(**inputs), model, layer).detach()

    @torch.no_grad()
    def ref_forward(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        """The reference logits ``[B, T, V]`` (no grad): ``ref_model``, or the PEFT model
        with adapters disabled and every module in eval mode (no dropout)."""
        inputs = self.inputs(batch)
        if self.ref_model is not None:
            return extract_logits(self.ref_model(**inputs), "ref_model").detach()
        with adapters_disabled(self.model) as model:
            return extract_logits(model(**inputs), "model (adapters disabled)").detach()
