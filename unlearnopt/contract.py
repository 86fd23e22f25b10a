"""The contract between unlearning methods and the unlearner that runs them.

Imports go one way: this module <- ``unlearnopt.methods`` <- ``unlearnopt.unlearner``. A
method never sees the unlearner: its objectives read an :class:`ObjectiveContext` (which
holds the forward passes as plain callables), and a method with a step of its own receives
a :class:`StepTools` object, the small set of building blocks listed here.

The standard step, which the unlearner runs for every method whose ``step_recipe()`` is
None::

    for each objective i (grouped by the batch it reads, one forward per micro-batch):
        g_i = gradient of objective i's loss        # K backward passes, trainable params only
    gram = grad_gram([g_1 .. g_K])                   # [P, K, K] and [K, K], fp32
    coeffs = aggregator.coefficients(gram)           # [1, K] (global) or [P, K] (per tensor)
    p.grad = sum_i coeffs[., i] * g_i                # then clipping, then optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from unlearnopt.errors import UnlearningStepError

if TYPE_CHECKING:  # pragma: no cover - imports for type checkers only
    from unlearnopt.aggregate.aggregator import Aggregator
    from unlearnopt.ops.grad_gram import GradGram

__all__ = [
    "AUX_PREFIX",
    "BATCH_KINDS",
    "UNITS",
    "AtomicUpdate",
    "Batch",
    "Forward",
    "Grads",
    "LayerForward",
    "Objective",
    "ObjectiveContext",
    "StepRecipe",
    "StepTools",
    "UnlearningStepError",
    "Weighed",
    "attach_aux",
]

BATCH_KINDS = ("forget", "retain")
UNITS = ("token", "sequence")

Batch = Mapping[str, Any]
#: ``forward(batch, kind) -> logits [B, T, V]``: the trained model's (with a graph) or the
#: reference's (under ``torch.no_grad()``).
Forward = Callable[[Batch, str], torch.Tensor]
#: ``layer_forward(batch, kind, layer, train_from, reference) -> hidden [B, T, H]``: the output
#: of decoder layer ``layer`` of the trained model (gradient only into layers
#: ``train_from .. layer`` when ``train_from`` is not None) or, with ``reference=True``, of the
#: reference (no grad).
LayerForward = Callable[[Batch, str, int, "int | None", bool], torch.Tensor]
#: Batch entries named ``aux_<name>_<key>`` travel with a batch (split into micro-batches with
#: it) but are never given to the model; :meth:`ObjectiveContext.aux` reads them as a batch of
#: their own, e.g. ``aux_idk_input_ids`` / ``aux_idk_attention_mask`` / ``aux_idk_labels``.
AUX_PREFIX = "aux_"


def attach_aux(batch: Mapping[str, Any], name: str, aux: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` plus every entry of ``aux`` as ``aux_<name>_<key>`` (a new dict); the two must
    have the same number of sequences (dim 0) so micro-batches split them together."""
    if not name or not isinstance(name, str):
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    rows, aux_rows = batch["labels"].shape[0], aux["labels"].shape[0]
    if rows != aux_rows:
        raise ValueError(
            f"the auxiliary batch {name!r} has {aux_rows} sequences but the batch "
            f"has {rows}; they must pair up row by row"
        )
    return {**batch, **{f"{AUX_PREFIX}{name}_{k}": v for k, v in aux.items()}}


#: K lists of P gradients (one per trainable parameter, ``None`` = not reached).
Grads = list[list[torch.Tensor | None]]


class ObjectiveContext:
    """What an objective's loss function sees for one micro-batch.

    Attributes (logits computed lazily and cached, so objectives reading the same batch
    share one forward pass of the model and one of the reference):
        batch: the Hugging Face batch dict (``input_ids`` ``[B, T]``, ``attention_mask``,
            ``labels`` ``[B, T]`` with -100 = ignored, ``pixel_values`` ...).
        kind: ``"forget"`` or ``"retain"``.
        labels: ``batch["labels"]``, ``[B, T]`` int64, *unshifted* (the objectives shift).
        logits: the trained model's logits ``[B, T, V]`` (requires grad).
        ref_logits: the reference model's logits ``[B, T, V]``, computed under
            ``torch.no_grad()`` (the frozen copy, or the PEFT model with adapters disabled).
        head: the trained model's output-head inputs (``unlearnopt.output_head.HeadInputs``:
            hidden states ``[B, T, H]``, head weight ``[V, H]``, bias), or None when the
            fused-linear path is off; then the objectives read ``logits``.
        ref_head: the reference's head inputs (no grad), or None.
        ref_sequence_log_prob: the reference's per-sequence log-probabilities ``[B]`` (no
            grad; NPO), or None when the context has no way to give them.

    The losses in ``unlearnopt.objectives.from_context`` (``token_loss_of(ctx, ...)`` etc.)
    read ``head`` when it is there and ``logits`` otherwise: an objective written with them
    never builds ``[B, T, V]`` logits on the fused-linear path.

    Args:
        batch, kind: as above.
        forward: ``forward(batch, kind)`` -> the trained model's logits.
        ref_forward: ``ref_forward(batch, kind)`` -> the reference's logits; None when no
            reference exists (reading ``ref_logits`` then raises ``ValueError``).
        head_forward: ``head_forward(batch, kind)`` -> the trained model's head inputs or
            None (fused-linear path off); None: no fused-linear path.
        ref_head_forward: the same for the reference (no grad).
        ref_log_prob_forward: ``(batch, kind)`` -> the reference's ``[B]`` log-probabilities.
        layer_forward: a :data:`LayerForward` for :meth:`hidden_at` / :meth:`ref_hidden_at`;
            None when the runner cannot read decoder layers (those then raise ``ValueError``).
    """

    def __init__(
        self,
        batch: Batch,
        kind: str,
        forward: Forward,
        ref_forward: Forward | None = None,
        *,
        head_forward: Callable[[Batch, str], Any] | None = None,
        ref_head_forward: Callable[[Batch, str], Any] | None = None,
        ref_log_prob_forward: Forward | None = None,
        layer_forward: LayerForward | None = None,
    ):
        self.batch = batch
        self.kind = kind
        self._forward = forward
        self._ref_forward = ref_forward
        self._head_forward = head_forward
        self._ref_head_forward = ref_head_forward
        self._ref_log_prob_forward = ref_log_prob_forward
        self._layer_forward = layer_forward
        self._logits: torch.Tensor | None = None
        self._ref_logits: torch.Tensor | None = None
        self._memo: dict[str, Any] = {}
        self._hidden: dict[tuple, torch.Tensor] = {}
        self._aux: dict[str, ObjectiveContext] = {}

    def _once(self, name: str, fn: Callable[[Batch, str], Any] | None) -> Any:
        if fn is None:
            return None
        if name not in self._memo:
            self._memo[name] = fn(self.batch, self.kind)
        return self._memo[name]

    @property
    def head(self) -> Any:
        return self._once("head", self._head_forward)

    @property
    def ref_head(self) -> Any:
        return self._once("ref_head", self._ref_head_forward)

    @property
    def ref_sequence_log_prob(self) -> torch.Tensor | None:
        return self._once("ref_sequence_log_prob", self._ref_log_prob_forward)

    @property
    def labels(self) -> torch.Tensor:
        return self.batch["labels"]

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self._forward(self.batch, self.kind)
        return self._logits

    @property
    def ref_logits(self) -> torch.Tensor:
        if self._ref_logits is None:
            if self._ref_forward is None:
                raise ValueError("this objective reads ref_logits but no reference model was given")
            self._ref_logits = self._ref_forward(self.batch, self.kind)
        return self._ref_logits

    def hidden_at(self, layer: int, train_from: int | None = None) -> torch.Tensor:
        """The trained model's hidden states ``[B, T, H]`` after decoder layer ``layer``
        (0-based, negative from the end); with ``train_from``, the gradient reaches only
        layers ``train_from .. layer``. One (truncated) forward per distinct argument pair."""
        return self._layer(layer, train_from, False)

    def ref_hidden_at(self, layer: int) -> torch.Tensor:
        """The reference's hidden states ``[B, T, H]`` after decoder layer ``layer`` (no grad)."""
        return self._layer(layer, None, True)

    def _layer(self, layer: int, train_from: int | None, reference: bool) -> torch.Tensor:
        if self._layer_forward is None:
            raise ValueError(
                "this objective reads a decoder layer's hidden states, which "
                "this runner does not provide (no layer_forward)"
            )
        key = (layer, train_from, reference)
        if key not in self._hidden:
            self._hidden[key] = self._layer_forward(
                self.batch, self.kind, layer, train_from, reference
            )
        return self._hidden[key]

    def aux(self, name: str) -> ObjectiveContext:
        """A context on the auxiliary batch ``name``: the entries ``aux_<name>_<key>`` of this
        batch as ``<key>`` (same forward passes, its own cache).

        Raises:
            ValueError: when the batch has no ``aux_<name>_labels``.
        """
        if name not in self._aux:
            prefix = f"{AUX_PREFIX}{name}_"
            sub = {k[len(prefix) :]: v for k, v in self.batch.items() if k.startswith(prefix)}
            if "labels" not in sub:
                raise ValueError(
                    f"this objective reads the auxiliary batch {name!r}, but the "
                    f"batch has no {prefix}labels (keys: {sorted(self.batch)})"
                )
            self._aux[name] = ObjectiveContext(
                sub,
                self.kind,
                self._forward,
                self._ref_forward,
                head_forward=self._head_forward,
                ref_head_forward=self._ref_head_forward,
                ref_log_prob_forward=self._ref_log_prob_forward,
                layer_forward=self._layer_forward,
            )
        return self._aux[name]


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
    count: Callable[[Batch], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.batch not in BATCH_KINDS:
            raise ValueError(
                f"Objective {self.name!r}: batch must be one of {BATCH_KINDS}, got {self.batch!r}"
            )
        if self.unit not in UNITS:
            raise ValueError(
                f"Objective {self.name!r}: unit must be one of {UNITS}, got {self.unit!r}"
            )

    def units(self, batch: Batch) -> torch.Tensor:
        """The number of units (tokens or sequences) this objective averages over, 0-dim."""
        if self.count is not None:
            return self.count(batch)
        labels = batch["labels"]
        if self.unit == "sequence":
            return torch.tensor(labels.shape[0], device=labels.device)
        return (labels[:, 1:] != -100).sum()


class Weighed(NamedTuple):
    """The checked outcome of weighing K gradients (:meth:`StepTools.weigh`).

    Attributes:
        stats: ``loss/<name>``, ``weight/<name>``, ``grad_norm/<name>``, ``sat_out/<name>``,
            ``grad_norm/direction``, ``cos/<a>/<b>`` and any extra entries, as floats.
        coefficients: ``[1, K]`` or ``[P, K]``: what multiplies each objective's gradient.
        overflow: True when the (GradScaler-scaled) gradients overflowed: the step must be
            skipped (pass it to :meth:`AtomicUpdate.apply`).
    """

    stats: dict[str, float]
    coefficients: torch.Tensor
    overflow: bool


class AtomicUpdate(Protocol):
    """One all-or-nothing update of the trainable parameters (``with tools.atomic() as u``).

    If the block raises, or the GradScaler skips the step, the parameters (when
    :meth:`move` changed them), every ``p.grad`` and the optimizer state are restored.
    """

    stepped: bool

    def move(
        self, delta: Sequence[torch.Tensor | None], *, alpha: Sequence[float] | None = None
    ) -> None:
        """θ ← θ + alpha·delta directly (not through the optimizer; ``alpha`` one factor per
        parameter, default 1). Before :meth:`apply`: undone if the update fails; after a
        step that was taken: final (no copy of the parameters is kept for it)."""

    def apply(self, direction: Sequence[torch.Tensor | None], *, overflow: bool = False) -> bool:
        """Write ``direction`` into ``p.grad``, clip, and take the wrapped optimizer's step
        (through the GradScaler if any). Returns False if the step was skipped.
        ``stepped`` tells the same afterwards."""


class StepTools(Protocol):
    """The building blocks a method's own step recipe may use (given by the unlearner).

    Attributes:
        params: the trainable parameters of the wrapped optimizer, in order (P of them).
        accumulate: the number of micro-batches a batch dict is split into.
        world_size: number of ranks the gradients are reduced over (1 without DDP/FSDP2).
        scaler: the ``torch.amp.GradScaler`` of fp16 training, or None.
    """

    params: Sequence[torch.nn.Parameter]
    accumulate: int
    world_size: int
    scaler: torch.amp.GradScaler | None

    def micro_batches(self, batch: Any, kind: str) -> list[Batch]:
        """Validate a batch (dict or list of dicts) and split it into micro-batches."""

    def forward(self, batch: Batch, kind: str) -> torch.Tensor:
        """The trained model's logits ``[B, T, V]``."""

    def ref_forward(self, batch: Batch, kind: str) -> torch.Tensor:
        """The reference's logits ``[B, T, V]`` (no grad)."""

    def context(self, batch: Batch, kind: str) -> ObjectiveContext:
        """The objective context of one micro-batch, as the standard step builds it (head
        inputs on the fused-linear path, the reference's outputs through its cache)."""

    def learning_rates(self) -> list[float]:
        """The current ``lr`` of each trainable parameter's group in the wrapped optimizer."""

    def objective_gradients(
        self, objectives: Sequence[Objective], forget: Any, retain: Any
    ) -> tuple[dict[str, torch.Tensor], Grads]:
        """Losses (global means, 0-dim float32) and per-objective gradients, reduced
        across ranks; every ``p.grad`` is left as it was."""

    def gram(self, grads: Grads) -> GradGram:
        """``GradGram(per_tensor [P, K, K], total [K, K])`` fp32 of K gradients."""

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
        """Gram -> coefficients -> stats (one host sync). Raises
        :class:`UnlearningStepError` on a non-finite loss, gradient or extra entry."""

    def atomic(self) -> contextlib.AbstractContextManager[AtomicUpdate]:
        """An all-or-nothing update (see :class:`AtomicUpdate`)."""

    def read_stats(self, values: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """0-dim tensors -> floats in one host sync; raises :class:`UnlearningStepError`
        naming the non-finite entries."""

    def aggregate_and_step(
        self,
        aggregator: Aggregator,
        names: Sequence[str],
        losses: Mapping[str, torch.Tensor],
        grads: Grads,
    ) -> dict[str, float]:
        """weigh -> combine -> one optimizer step, atomically; the stats."""

    def standard_step(
        self, objectives: Sequence[Objective], aggregator: Aggregator, forget: Any, retain: Any
    ) -> dict[str, float]:
        """The standard step (module docstring) for these objectives and aggregator."""


#: A method's own step: ``recipe(tools, forget, retain) -> stats`` (floats).
StepRecipe = Callable[[StepTools, Any, Any], dict[str, float]]
