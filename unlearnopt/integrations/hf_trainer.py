"""Unlearning inside the Hugging Face ``Trainer``.

The ``Trainer`` keeps doing what it does (data loading, device placement, LR scheduling,
logging, checkpoints, callbacks); only the training step changes. Each training example is a
pair ``{"forget": example, "retain": example}``; :class:`ForgetRetainCollator` collates the
two halves separately into ``{"forget": batch, "retain": batch}``, and
:meth:`UnlearningTrainer.training_step` runs one :class:`~unlearnopt.unlearner.
MultiObjectiveUnlearner` step on them, which computes the method's direction and steps the
``Trainer``'s optimizer itself. It then clears every ``p.grad``, so the ``Trainer``'s own
clipping and ``optimizer.step()`` that follow are no-ops (torch optimizers skip parameters
without a gradient) while its LR scheduler still advances once per step::

    from unlearnopt.integrations.hf_trainer import (ForgetRetainCollator, ForgetRetainDataset,
                                                    UnlearningTrainer)

    train = ForgetRetainDataset(forget_examples, retain_examples)      # cycles the shorter
    args = TrainingArguments(output_dir="out", per_device_train_batch_size=4, max_steps=30,
                             learning_rate=1e-5, report_to=[])
    trainer = UnlearningTrainer(model=model, args=args, train_dataset=train,
                                data_collator=ForgetRetainCollator(DataCollatorForSeq2Seq(tok)),
                                unlearning_method="grad_diff", ref_model=None)
    trainer.train()

Rules: ``gradient_accumulation_steps`` must be 1 (pass ``accumulate=`` in
``unlearner_options`` instead: the unlearner splits each batch into micro-batches exactly);
``remove_unused_columns`` is set to False (the ``forget``/``retain`` columns are not model
arguments); ``args.max_grad_norm`` > 0 becomes the unlearner's clipping. The latest step's
statistics are added to the ``Trainer``'s logs under ``unlearn/<name>``; the ``loss`` the
``Trainer`` logs is the step's first objective's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import Trainer

BATCH_KEYS = ("forget", "retain")


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Pairs forget and retain examples: item i is ``{"forget": forget[i % F], "retain":
    retain[i % R]}``; its length is the longer of the two (the shorter one cycles).

    ``retain=None`` (methods that need no retain set, e.g. ``ga``) gives ``{"forget": ...}``.
    """

    def __init__(self, forget: Sequence[Any], retain: Sequence[Any] | None = None):
        if len(forget) == 0:
            raise ValueError("forget must hold at least one example")
        if retain is not None and len(retain) == 0:
            raise ValueError("retain must hold at least one example (or be None)")
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return max(len(self.forget), len(self.retain) if self.retain is not None else 0)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"forget": self.forget[i % len(self.forget)]}
        if self.retain is not None:
            item["retain"] = self.retain[i % len(self.retain)]
        return item


class ForgetRetainCollator:
    """Collates ``[{"forget": ex, "retain": ex}, ...]`` into ``{"forget": batch, "retain":
    batch}`` with ``base`` (any Hugging Face collator, default ``default_data_collator``)
    applied to each half separately (so each is padded to its own length)."""

    def __init__(self, base: Callable[[list[Any]], Mapping[str, Any]] | None = None):
        if base is None:
            from transformers import default_data_collator

            base = default_data_collator
        self.base = base

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        out = {}
        for key in BATCH_KEYS:
            present = [key in ex for ex in examples]
            if any(present) and not all(present):
                raise ValueError(f"some examples have a {key!r} part and some do not")
            if all(present):
                out[key] = dict(self.base([ex[key] for ex in examples]))
        if "forget" not in out:
            raise ValueError(
                f"examples must be dicts with a 'forget' part (and 'retain'), got "
                f"keys {sorted(examples[0])}"
            )
        return out


class UnlearningTrainer(Trainer):
    """A ``Trainer`` whose training step is ``MultiObjectiveUnlearner.step`` (module docstring).

    Args:
        unlearning_method: the method name (``"mollm"``, ``"grad_diff"``, ``"siu"``,
            ``"ofmu"``, ...), class or instance.
        ref_model: the frozen original for methods that need one (moved to the training
            device); None with a PEFT model uses the adapters-disabled model.
        unlearner_options: keyword arguments for ``MultiObjectiveUnlearner`` and the method
            (e.g. ``{"accumulate": 2, "normalize": "unit"}``).
        *args, **kwargs: everything ``Trainer`` takes.

    Attributes:
        unlearner: the ``MultiObjectiveUnlearner``, created at the first training step (the
            ``Trainer`` creates its optimizer inside ``train()``).
        unlearning_stats: the last step's statistics (dict of floats).
    """

    def __init__(
        self,
        *args: Any,
        unlearning_method: Any = "mollm",
        ref_model: torch.nn.Module | None = None,
        unlearner_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "UnlearningTrainer needs gradient_accumulation_steps=1, got "
                f"{self.args.gradient_accumulation_steps}; pass "
                "unlearner_options={'accumulate': n} to split batches instead"
            )
        # The forget/retain columns are not arguments of model.forward.
        self.args.remove_unused_columns = False
        self.unlearning_method = unlearning_method
        self.ref_model = ref_model
        self.unlearner_options = dict(unlearner_options or {})
        self.unlearner = None
        self.unlearning_stats: dict[str, float] = {}

    def _make_unlearner(self, model: torch.nn.Module):
        from unlearnopt.unlearner import MultiObjectiveUnlearner

        # The raw torch optimizer: accelerate's wrapper would gate or rescale a step the
        # unlearner already prepared.
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        ref = self.ref_model.to(self.args.device) if self.ref_model is not None else None
        options = dict(self.unlearner_options)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            options.setdefault("max_grad_norm", float(self.args.max_grad_norm))
        return MultiObjectiveUnlearner(
            model, optimizer, method=self.unlearning_method, ref_model=ref, **options
        )

    def training_step(
        self, model: torch.nn.Module, inputs: Mapping[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One unlearning step on ``inputs = {"forget": batch, "retain": batch}``; returns the
        first objective's loss (detached, on the training device) for the ``Trainer``'s log."""
        if not isinstance(inputs, Mapping) or "forget" not in inputs:
            raise ValueError(
                "UnlearningTrainer expects batches {'forget': ..., 'retain': ...} "
                "(use ForgetRetainDataset and ForgetRetainCollator); got keys "
                f"{sorted(inputs) if isinstance(inputs, Mapping) else type(inputs)}"
            )
        model.train()
        if self.unlearner is None:
            self.unlearner = self._make_unlearner(model)
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            stats = self.unlearner.step(forget=inputs["forget"], retain=inputs.get("retain"))
        # The unlearner has stepped; the Trainer's optimizer.step() must find no gradient.
        for p in self.unlearner.params:
            p.grad = None
        self.unlearning_stats = stats
        first = next((v for k, v in stats.items() if k.startswith("loss/")), 0.0)
        return torch.tensor(first, device=self.args.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.unlearning_stats and "loss" in logs:  # training logs only
            logs = {**logs, **{f"unlearn/{k}": v for k, v in self.unlearning_stats.items()}}
        super().log(logs, *args, **kwargs)
