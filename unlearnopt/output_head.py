"""The final hidden states and the output head of a causal LM, without its ``[B, T, V]`` logits.

A causal LM ends in ``logits = post(head(hidden))`` with ``head`` a linear layer
``[V, H]`` (``model.get_output_embeddings()``) and ``post`` whatever the model does to the
head's output (nothing for Llama, Qwen2, GPT-2; ``* logit_scale`` for Cohere,
``/ logits_scaling`` for Granite; ``cap * tanh(x / cap)`` for Gemma-2/3). The fused-linear
ops need ``hidden``, the weight and the bias instead of the logits, so that no ``[B, T, V]``
tensor is ever built.

How :func:`forward_head_inputs` gets them, for any model (Hugging Face causal LMs,
LLaVA-style models whose language model holds the head, PEFT wrappers, DDP): for the
duration of one call the head's ``forward`` is replaced by one that records its input
``[B, T, H]`` and returns a tiny *probe* ``[B, T, P]`` of known values instead of
``[B, T, V]`` logits; the (possibly wrapped) model is then called as usual, so DDP's and
the model's own code run unchanged. What comes back as the model's "logits" is ``post``
applied to the probe, which tells exactly what ``post`` is:

- the probe unchanged: ``logits = hidden @ W.T + b``;
- the probe times one constant ``s``: the scale is folded into the returned hidden states
  and bias (``s * (h @ W.T + b) = (s h) @ W.T + s b``), so the ops see a plain linear head;
- anything else (soft-capping, a head called twice, values mixed across the vocabulary):
  :class:`HeadUnsupported` with the reason; the caller computes the logits instead.

A PEFT LoRA adapter on the head itself (``base(x) + s * B(A(x))``) is a linear head too:
its weight is ``W + s * B @ A`` (``[V, H]``, built per forward, so gradients reach ``A`` and
``B`` through it), its bias the base bias plus ``s`` times ``B``'s bias if any; with the
adapters disabled (a PEFT model as its own reference) it is the base layer.

Heads that cannot be fused are recognised before any forward (:func:`unsupported_reason`):
no output embeddings, a head that is neither a plain ``torch.nn.Linear`` nor a plain LoRA
layer over one (DoRA and other LoRA variants, a merged LoRA head, dropout on a LoRA head
in training), and a head whose forward is already wrapped (accelerate's device-map hooks).

FSDP2 (``fully_shard``): outside its module's forward the head's weight is a shard, so the
weight is read *inside* the forward (the all-gathered parameter), and it must still hold its
values when the objectives read it afterwards. That is the case when the head belongs to
the root ``fully_shard`` module, which FSDP2 does not reshard after the forward (its
default); a head whose weight was resharded (its own ``fully_shard`` unit, or
``reshard_after_forward=True`` on the root) is reported as unsupported. FSDP2 hooks its
backward work (the pre-backward all-gather state, the final reduce-scatter callback) on
the *outputs* of the root's forward, which the fused objectives never read; so the hidden
states handed out are tied to the model's output by ``hidden + 0 * sum(output)`` (a
``[B, T, P]`` probe, a few values per token), which fires those hooks at no real cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Values the probe head returns at every position: exact in bfloat16/float16, spanning the
# range where soft-capping (tanh) is visibly non-linear and a scale is measurable.
PROBE_VALUES = (-40.0, -3.0, -0.5, 0.0, 0.25, 2.0, 7.0, 32.0)


class HeadUnsupported(RuntimeError):
    """The model's output head cannot be replaced by the fused-linear path; ``reason`` says
    why (one sentence)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HeadInputs:
    """What the fused-linear ops need instead of the logits.

    ``logits == torch.nn.functional.linear(hidden, weight, bias)`` (any constant logit scale
    of the model is already folded into ``hidden`` and ``bias``).

    Attributes:
        hidden: ``[B, T, H]`` the input of the output head (times the logit scale), in the
            graph of the model's forward (requires grad in training).
        weight: ``[V, H]`` the head's weight (the embedding matrix for tied heads); a
            parameter of the model, so gradients reach it.
        bias: ``[V]`` (times the logit scale) or None.
        scale: the logit scale folded in (1.0 for most models).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0

    def logits(self) -> torch.Tensor:
        """The full logits ``[B, T, V]`` (for tests and checks; the point is not to call it)."""
        return torch.nn.functional.linear(self.hidden, self.weight, self.bias)

    def detach(self) -> HeadInputs:
        """A copy cut from the graph (for a reference model's outputs)."""
        return HeadInputs(
            self.hidden.detach(),
            self.weight.detach(),
            None if self.bias is None else self.bias.detach(),
            self.scale,
        )


def _unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _is_fsdp2(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        pass
    else:
        if any(isinstance(m, FSDPModule) for m in model.modules()):
            return True
    return any(type(p).__name__ == "DTensor" for p in head.parameters())


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model.get_output_embeddings()`` of the model inside DDP / PEFT wrappers, or None."""
    base = _unwrap_ddp(model)
    getter = getattr(base, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (AttributeError, NotImplementedError):
        return None


def _is_plain_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


def _is_lora_linear(module: torch.nn.Module) -> bool:
    """A PEFT LoRA layer over a plain linear layer (``peft.tuners.lora.Linear``)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # peft not installed
        return False
    return type(module) is LoraLinear and _is_plain_linear(module.get_base_layer())


def _lora_reason(head: torch.nn.Module) -> str | None:
    """Why a LoRA head is not ``W + s B A`` (None if it is), for its current state."""
    if head.merged:
        return "its LoRA output head is merged into the base weight"
    if head.disable_adapters:
        return None
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}) or head.use_dora.get(name, False):
            return f"its LoRA output head uses a LoRA variant (e.g. DoRA) for adapter {name!r}"
        if getattr(head, "fan_in_fan_out", False):
            return "its LoRA output head has fan_in_fan_out=True"
        dropout = head.lora_dropout[name]
        if dropout.training and float(getattr(dropout, "p", 0.0)) > 0.0:
            return (
                f"its LoRA output head applies dropout (p = {dropout.p}) in training to "
                f"adapter {name!r}"
            )
    return None


def _lora_weight_and_bias(head: torch.nn.Module):
    """``(W + sum_a s_a B_a A_a, b + sum_a s_a b_Ba)`` of a LoRA head (the base layer's own
    weight and bias when its adapters are disabled)."""
    base = head.get_base_layer()
    weight, bias = base.weight, base.bias
    if head.disable_adapters:
        return weight, bias
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        a, b, s = head.lora_A[name], head.lora_B[name], head.scaling[name]
        weight = weight + (b.weight @ a.weight).to(weight.dtype) * s
        if b.bias is not None:
            extra = (b.bias * s).to(weight.dtype)
            bias = extra if bias is None else bias + extra
    return weight, bias


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the fused-linear path cannot serve ``model`` (None if it can be tried).

    Checks the structure only; a model that post-processes its logits in a way the ops cannot
    reproduce is found by the first :func:`forward_head_inputs` call.
    """
    head = output_head(model)
    if head is None:
        return "the model has no output head (get_output_embeddings() is missing or returns None)"
    if _is_lora_linear(head):
        reason = _lora_reason(head)
        if reason is not None:
            return reason
    elif not _is_plain_linear(head):
        return (
            f"its output head is a {type(head).__module__}.{type(head).__qualname__}, "
            "neither a plain torch.nn.Linear nor a plain LoRA layer over one"
        )
    if "forward" in vars(head):
        return "its output head's forward is already wrapped (e.g. accelerate device-map hooks)"
    weight = head.get_base_layer().weight if _is_lora_linear(head) else head.weight
    if not weight.dtype.is_floating_point:
        return f"its output head's weight has dtype {weight.dtype}, not a float dtype"
    return None


def _logits_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    return getattr(output, "logits", None)


def _softcap(model: torch.nn.Module) -> float | None:
    """The ``final_logit_softcapping`` of the model's (or its text model's) config, if set."""
    config = getattr(_unwrap_ddp(model), "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if isinstance(cap, (int, float)) and cap > 0:
            return float(cap)
    return None


def _scale_from_probe(model: torch.nn.Module, probe: torch.Tensor, out: torch.Tensor) -> float:
    """The constant ``s`` with ``out == s * probe`` (everywhere), else HeadUnsupported."""
    if tuple(out.shape) != tuple(probe.shape):
        raise HeadUnsupported(
            f"the model's logits have shape {tuple(out.shape)} where the head "
            f"returned {tuple(probe.shape)}: it reshapes or slices them"
        )
    p = probe.double()
    o = out.detach().double()
    eps = torch.finfo(out.dtype).eps if out.dtype.is_floating_point else 0.0
    if torch.equal(o, p):
        return 1.0
    s = float(o[..., -1].mean() / PROBE_VALUES[-1])
    if math.isfinite(s) and s != 0.0 and torch.allclose(o, s * p, rtol=4 * eps, atol=0.0):
        return s
    cap = _softcap(model)
    if cap is not None and torch.allclose(
        o, cap * torch.tanh(p / cap), rtol=16 * eps, atol=16 * eps
    ):
        raise HeadUnsupported(
            f"final-logit soft-capping (cap * tanh(logits / cap), cap = {cap:g}) "
            "is not supported by the fused-linear ops"
        )
    raise HeadUnsupported(
        "the model transforms its head's output by more than a constant scale "
        "(e.g. soft-capping or a non-linear function)"
    )


def forward_head_inputs(model: torch.nn.Module, inputs: Mapping[str, Any]) -> HeadInputs:
    """Run ``model(**inputs)`` without computing the logits; return the head's inputs.

    Args:
        model: a causal LM (Hugging Face, LLaVA-style, PEFT, DDP-wrapped) whose forward,
            called as ``model(**inputs)``, returns logits (a tensor or ``.logits``) computed
            by ``model.get_output_embeddings()``.
        inputs: the model's keyword arguments (no labels: the model must not compute a loss).

    Returns:
        :class:`HeadInputs` with ``hidden [B, T, H]`` in the forward's graph (under the
        caller's grad mode and autocast), ``weight [V, H]``, ``bias [V] | None``.

    Raises:
        HeadUnsupported: with the reason, if :func:`unsupported_reason` has one, or the model
            does not call its head exactly once, or post-processes its output by more than a
            constant scale. The forward has then run for nothing; call the model normally.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise HeadUnsupported(reason)
    head = output_head(model)
    fsdp = _is_fsdp2(model, head)
    seen: list[torch.Tensor] = []
    probes: list[torch.Tensor] = []
    params: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        # Read inside the forward: under FSDP2 these are the all-gathered parameters.
        weight, bias = (
            _lora_weight_and_bias(head) if _is_lora_linear(head) else (head.weight, head.bias)
        )
        seen.append(x)
        params.append((weight, bias))
        # The dtype the real head would return (autocast included), at no cost.
        empty = torch.nn.functional.linear(
            x.reshape(-1, x.shape[-1])[:0], weight[:0], None if bias is None else bias[:0]
        )
        probe = torch.tensor(PROBE_VALUES, dtype=empty.dtype, device=x.device)
        probe = probe.expand(*x.shape[:-1], len(PROBE_VALUES)).contiguous()
        if fsdp and x.requires_grad:  # in the graph, so the model's output carries FSDP2's hooks
            probe = probe + 0 * x[..., :1].to(probe.dtype)
        probes.append(probe)
        return probe

    head.forward = record
    try:
        output = model(**inputs)
    finally:
        del head.forward
    if len(seen) != 1:
        raise HeadUnsupported(
            f"the model called its output head {len(seen)} times in one forward (expected once)"
        )
    out = _logits_of(output)
    if not isinstance(out, torch.Tensor):
        raise HeadUnsupported(
            f"the model's forward returned {type(output).__name__} without logits"
        )
    scale = _scale_from_probe(model, probes[0].detach(), out)
    hidden = seen[0]
    weight, bias = params[0]
    if fsdp:
        if any(t is not None and t.untyped_storage().size() == 0 for t in (weight, bias)):
            raise HeadUnsupported(
                "FSDP2 resharded the output head's weight after the forward (the head has "
                "its own fully_shard unit, or reshard_after_forward=True on the root)"
            )
        if out.requires_grad:
            hidden = hidden + 0 * out.sum().to(hidden.dtype)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return HeadInputs(hidden, weight, bias, scale)
