"""The contract every unlearning method follows, and the registry of named methods.

A *method* is a small recipe: which losses it minimises (its :class:`Objective` list),
how their gradients become one update (its aggregator, see ``unlearnopt.aggregate``),
its default hyper-parameters (with the paper's numbers), and, only if it needs one, its
own ``step()`` (OFMU's bi-level step does) and its own state (``state_dict``).

The generic step, run by :class:`~unlearnopt.unlearner.MultiObjectiveUnlearner` for any
method that does not override :meth:`Method.step`::

    for each objective i (grouped by the batch it reads, one forward per micro-batch):
        g_i = gradient of objective i's loss        # K backward passes, trainable params only
    gram = grad_gram([g_1 .. g_K])                   # [P, K, K] and [K, K], fp32
    coeffs = aggregator.coefficients(gram)           # [1, K] (global) or [P, K] (per tensor)
    p.grad = sum_i coeffs[., i] * g_i                # then clipping, then optimizer.step()

Writing a method::

    from unlearnopt.methods.base import Method, Objective, register_method
    from unlearnopt.aggregate import FixedWeights
    from unlearnopt.objectives import token_loss

    class MyGA(Method):
        name = "my_ga"
        defaults = {"alpha": 0.5}

        def objectives(self):
            a = self.config["alpha"]
            return [Objective("forget_uce", "forget",
                              lambda ctx: token_loss(ctx.logits, ctx.labels, "uce", alpha=a))]

        def aggregator(self):
            return FixedWeights([1.0])

    register_method("my_ga", MyGA)
    # MultiObjectiveUnlearner(model, opt, method="my_ga", alpha=0.3)

A method that needs its own step (OFMU) overrides :meth:`Method.step` and uses the
unlearner's public building blocks: ``unlearner.params`` (the trainable parameters of the
wrapped optimizer, in order), ``unlearner.forward(batch)`` / ``unlearner.ref_forward(batch)``
(logits ``[B, T, V]``), ``unlearner.objective_gradients(objectives, forget, retain)``
(losses and per-objective gradients, reduced across ranks), ``unlearner.gram(grads)``,
and ``unlearner.apply_direction(direction, stats)`` (checks, clipping, the wrapped
optimizer's step; leaves everything untouched on failure).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover - imports for type checkers only
    from unlearnopt.aggregate.aggregator import Aggregator
    from unlearnopt.unlearner import MultiObjectiveUnlearner

BATCH_KINDS = ("forget", "retain")
UNITS = ("token", "sequence")


class ObjectiveContext:
    """What an objective's loss function sees for one micro-batch.

    Attributes (all lazily computed and cached, so objectives reading the same batch share
    one forward pass of the model and one of the reference):
        batch: the Hugging Face batch dict (``input_ids`` ``[B, T]``, ``attention_mask``,
            ``labels`` ``[B, T]`` with -100 = ignored, ``pixel_values`` ...).
        labels: ``batch["labels"]``, ``[B, T]`` int64, *unshifted* (the objectives shift).
        logits: the trained model's logits ``[B, T, V]`` (requires grad).
        ref_logits: the reference model's logits ``[B, T, V]``, computed under
            ``torch.no_grad()`` (the frozen copy, or the PEFT model with adapters disabled).
        kind: ``"forget"`` or ``"retain"``.
        unlearner: the :class:`MultiObjectiveUnlearner` running the step.
    """

    def __init__(self, unlearner: MultiObjectiveUnlearner, batch: Mapping[str, Any], kind: str):
        self.unlearner = unlearner
        self.batch = batch
        self.kind = kind
        self._logits: torch.Tensor | None = None
        self._ref_logits: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        return self.batch["labels"]

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.unlearner.forward(self.batch, kind=self.kind)
        return self._logits

    @property
    def ref_logits(self) -> torch.Tensor:
        if self._ref_logits is None:
            self._ref_logits = self.unlearner.ref_forward(self.batch, kind=self.kind)
        return self._ref_logits


@dataclass(frozen=True)
class Objective:
    """One named loss of a method.

    Args:
        name: key of this objective in ``step()``'s stats (``loss/<name>``, ``weight/<name>``,
            ``grad_norm/<name>``); unique within a method.
        batch: ``"forget"`` or ``"retain"``: the batch whose micro-batches it reads.
        loss: ``loss(ctx: ObjectiveContext) -> Tensor`` scalar: the loss on ONE micro-batch,
            reduced as a *mean* over ``unit``. The unlearner recombines micro-batches (and
            ranks) into the mean over the whole batch, exactly, by weighting each micro-batch
            with its share of the units (``count``); so gradient accumulation and DDP equal
            one big batch.
        unit: ``"token"`` (mean over non-ignored shifted labels, the default) or
            ``"sequence"`` (mean over sequences, e.g. NPO).
        count: optional ``count(batch) -> Tensor`` 0-dim: the number of units in a batch;
            default derived from ``unit`` (``(labels[:, 1:] != -100).sum()`` or ``B``).
    """

    name: str
    batch: str
    loss: Callable[[ObjectiveContext], torch.Tensor]
    unit: str = "token"
    count: Callable[[Mapping[str, Any]], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.batch not in BATCH_KINDS:
            raise ValueError(f"Objective {self.name!r}: batch must be one of {BATCH_KINDS}, "
                             f"got {self.batch!r}")
        if self.unit not in UNITS:
            raise ValueError(f"Objective {self.name!r}: unit must be one of {UNITS}, "
                             f"got {self.unit!r}")

    def units(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The number of units (tokens or sequences) this objective averages over, 0-dim."""
        if self.count is not None:
            return self.count(batch)
        labels = batch["labels"]
        if self.unit == "sequence":
            return torch.tensor(labels.shape[0], device=labels.device)
        return (labels[:, 1:] != -100).sum()


class Method:
    """Base class of a named unlearning recipe.

    Subclasses set:
        name: the registry name.
        defaults: every hyper-parameter with its default (the paper's value, documented in
            the subclass docstring). ``Method(**config)`` accepts only these keys: an unknown
            keyword raises ``TypeError``.
        needs_ref: whether some objective reads ``ctx.ref_logits`` (then the unlearner needs
            ``ref_model=`` or a PEFT model whose adapters it can disable).
        needs_retain: whether ``step()`` requires a retain batch (computed from the
            objectives by default).

    and implement :meth:`objectives` and :meth:`aggregator`. Override :meth:`step` for a
    step that is not "K gradients -> Gram -> weights -> one optimizer step", and
    :meth:`state_dict` / :meth:`load_state_dict` if the method keeps state across steps
    (the config is saved too, so a resumed run checks it matches).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    needs_ref: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise TypeError(f"method {self.name!r} got unknown option(s) {unknown}; "
                            f"its options are {sorted(self.defaults)}")
        self.config: dict[str, Any] = {**copy.deepcopy(dict(self.defaults)), **config}
        self.validate_config()

    def validate_config(self) -> None:
        """Raise ``ValueError`` naming the option if ``self.config`` is invalid."""

    # -- the recipe ---------------------------------------------------------------------------
    def objectives(self) -> list[Objective]:
        """The method's objectives, in the order of the weights and of the Gram matrix."""
        raise NotImplementedError

    def aggregator(self) -> Aggregator:
        """How the K per-objective gradients combine into one direction."""
        raise NotImplementedError

    @property
    def needs_retain(self) -> bool:
        return any(o.batch == "retain" for o in self.objectives())

    def fact_batches(self, forget: Sequence[Any], retain: Sequence[Any], *,
                     encode: Callable[[Sequence[str], Sequence[str]], dict[str, torch.Tensor]],
                     tokenizer: Any, vocab_size: int) -> tuple[dict, dict | None]:
        """The ``(forget, retain)`` batches of one step on prompt -> answer facts.

        ``forget`` / ``retain``: facts (objects with ``prompt``, ``answer`` and ``id``);
        ``encode(prompts, answers)`` returns a batch dict (``input_ids``, ``attention_mask``,
        ``labels`` ``[B, T]`` int64, loss on the answer tokens) on the model's device. By
        default each side is encoded with its own answers (retain only when the method needs
        one); a method that trains on constructed targets overrides this.
        """
        fb = encode([f.prompt for f in forget], [f.answer for f in forget])
        rb = (encode([f.prompt for f in retain], [f.answer for f in retain])
              if retain and self.needs_retain else None)
        return fb, rb

    # -- the step -----------------------------------------------------------------------------
    def step(self, unlearner: MultiObjectiveUnlearner, forget, retain) -> dict[str, float]:
        """One update. ``forget`` / ``retain``: a batch dict, a list of micro-batch dicts, or
        None (retain only when the method needs none). Returns the stats (floats)."""
        return unlearner.standard_step(self, forget, retain)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The method's own state (config included); tensors are cloned."""
        return {"name": self.name, "config": copy.deepcopy(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for method {state.get('name')!r}, not {self.name!r}")
        self.config = copy.deepcopy(dict(state["config"]))
        self.validate_config()


# -- the registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Method]] = {}
# Built-in methods are imported on first use, so importing one does not import all of them.
_BUILTIN_MODULES = {
    "ga": "unlearnopt.methods.ga",
    "grad_diff": "unlearnopt.methods.grad_diff",
    "ga_kl": "unlearnopt.methods.ga_kl",
    "npo": "unlearnopt.methods.npo",
    "mollm": "unlearnopt.methods.mollm",
    "siu": "unlearnopt.methods.siu",
    "ofmu": "unlearnopt.methods.ofmu",
}


def register_method(name: str, cls: type[Method], *, overwrite: bool = False) -> type[Method]:
    """Register ``cls`` under ``name`` (``overwrite=True`` to replace an existing one).

    Usable as a plain call or from a module that defines a built-in method.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"cls must be a subclass of Method, got {cls!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls and not overwrite:
        raise ValueError(f"a method named {name!r} is already registered "
                         f"({_REGISTRY[name].__qualname__}); pass overwrite=True to replace it")
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (built-ins are imported on demand)."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Registered names plus the built-in names (sorted)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def make_method(method: str | Method | type[Method], **config: Any) -> Method:
    """A method instance from a name, a class or an instance (config only with name/class)."""
    if isinstance(method, Method):
        if config:
            raise TypeError(f"options {sorted(config)} given with a Method instance; "
                            "configure the instance instead")
        return method
    if isinstance(method, str):
        return get_method(method)(**config)
    if isinstance(method, type) and issubclass(method, Method):
        return method(**config)
    raise TypeError(f"method must be a name, a Method subclass or instance, got {method!r}")
