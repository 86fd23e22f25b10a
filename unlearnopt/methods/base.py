"""The base class of every unlearning method.

A *method* is a small recipe: which losses it minimises (its :class:`Objective` list),
how their gradients become one update (its aggregator, see ``unlearnopt.aggregate``),
its default hyper-parameters (with the paper's numbers), and, only if it needs one, its
own step recipe (OFMU's bi-level step, SIU's batch handling) and its own state
(``state_dict``). The unlearner runs the standard step (``unlearnopt.contract``) for every
method whose :meth:`Method.step_recipe` is None.

Writing a method::

    from unlearnopt.methods import Method, Objective, register_method
    from unlearnopt.aggregate import Aggregator, FixedWeights
    from unlearnopt.objectives import token_loss_of

    class MyGA(Method):
        name = "my_ga"
        defaults = {"alpha": 0.5}

        def objectives(self):
            a = self.config["alpha"]
            return [Objective("forget_uce", "forget",
                              lambda ctx: token_loss_of(ctx, "uce", alpha=a))]

        def aggregator(self):
            return Aggregator(FixedWeights([1.0]))

    register_method("my_ga", MyGA)
    # MultiObjectiveUnlearner(model, opt, method="my_ga", alpha=0.3)

A method with a step of its own returns it from :meth:`Method.step_recipe`: a callable
``recipe(tools, forget, retain) -> stats`` where ``tools`` is a
:class:`~unlearnopt.contract.StepTools` (micro-batches, forward passes, per-objective
gradients reduced across ranks, the Gram, the checked weighing, an atomic update with
clipping and the GradScaler, the standard step itself).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from unlearnopt.contract import BATCH_KINDS, UNITS, Objective, ObjectiveContext, StepRecipe

if TYPE_CHECKING:  # pragma: no cover - imports for type checkers only
    import torch

    from unlearnopt.aggregate.aggregator import Aggregator

__all__ = ["BATCH_KINDS", "UNITS", "Method", "Objective", "ObjectiveContext"]


class Method:
    """Base class of a named unlearning recipe.

    Subclasses set:
        name: the registry name.
        defaults: every hyper-parameter with its default (the paper's value, documented in
            the subclass docstring). ``Method(**config)`` accepts only these keys: an unknown
            keyword raises ``TypeError``.
        needs_ref: whether some objective reads the reference (then the unlearner needs
            ``ref_model=`` or a PEFT model whose adapters it can disable).
        needs_retain: whether ``step()`` requires a retain batch (computed from the
            objectives by default).

    and implement :meth:`objectives` and :meth:`aggregator`. Override :meth:`step_recipe`
    for a step that is not "K gradients -> Gram -> weights -> one optimizer step", and
    :meth:`state_dict` / :meth:`load_state_dict` if the method keeps state across steps
    (the config is saved too, so a resumed run checks it matches).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    needs_ref: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"method {self.name!r} got unknown option(s) {unknown}; "
                f"its options are {sorted(self.defaults)}"
            )
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

    def step_recipe(self) -> StepRecipe | None:
        """The method's own step, ``recipe(tools, forget, retain) -> stats``, or None for
        the standard step. ``forget`` / ``retain``: a batch dict, a list of micro-batch
        dicts, or None (retain only when the method needs none)."""
        return None

    def fact_batches(
        self,
        forget: Sequence[Any],
        retain: Sequence[Any],
        *,
        encode: Callable[[Sequence[str], Sequence[str]], dict[str, torch.Tensor]],
        tokenizer: Any,
        vocab_size: int,
    ) -> tuple[dict, dict | None]:
        """The ``(forget, retain)`` batches of one step on prompt -> answer facts.

        ``forget`` / ``retain``: facts (objects with ``prompt``, ``answer`` and ``id``);
        ``encode(prompts, answers)`` returns a batch dict (``input_ids``, ``attention_mask``,
        ``labels`` ``[B, T]`` int64, loss on the answer tokens) on the model's device. By
        default each side is encoded with its own answers (retain only when the method needs
        one); a method that trains on constructed targets overrides this.
        """
        fb = encode([f.prompt for f in forget], [f.answer for f in forget])
        rb = (
            encode([f.prompt for f in retain], [f.answer for f in retain])
            if retain and self.needs_retain
            else None
        )
        return fb, rb

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The method's own state (config included); tensors are cloned."""
        return {"name": self.name, "config": copy.deepcopy(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for method {state.get('name')!r}, not {self.name!r}")
        self.config = copy.deepcopy(dict(state["config"]))
        self.validate_config()
