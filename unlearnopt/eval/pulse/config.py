"""Settings of a PULSE run (:class:`PulseConfig`) and each method's resolved settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from unlearnopt.editing import EDIT_METHODS
from unlearnopt.training import (
    DEFAULT_LR,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_STEPS,
    same_relation_share,
    tuned_settings,
)

PHASES = ("pretrained", "finetuned")
# How a request's forget facts are drawn: "spread" over the relations (round-robin), all from
# one "relation", or every fact of one "subject" (see ``unlearnopt.eval.pulse.splits``).
FOCUS = ("spread", "relation", "subject")


@dataclass
class PulseConfig:
    """Settings of a PULSE run (defaults: five requests of two facts, as measured on SmolLM2-135M).

    ``phases``: ``"pretrained"`` (facts the model already knows) and/or ``"finetuned"`` (facts
    about invented people that the model is first fine-tuned on). The forget set
    (``forget_size`` facts) is served as ``requests`` sequential requests of at most ``steps``
    optimizer steps each (AdamW, ``lr``; ``method_options[m]["lr"]`` gives method ``m`` its
    own), with ``retain_batch_size`` retain facts per step drawn from ``retain_size``.
    ``forget_target``: forget accuracy that counts as forgotten; ``stop_at_target`` ends a
    request there. ``replay``: earlier requests' facts that the model answers again join the
    forget batch. ``fresh_optimizer``: a new optimizer per request. The fine-tuned phase
    teaches ``finetune_entities`` invented people (``finetune_lr``, ``finetune_epochs``).
    ``focus``: how a request's forget facts are drawn, one of :data:`FOCUS` (``"subject"``
    forgets every fact of ``requests`` subjects; ``forget_size`` is then not used).
    ``retain_same_relation``: the share of each step's retain batch taken from the retain
    facts of the forget batch's relations (0: off; True: 0.5; never a neighbour: neighbours
    are not in the retain set). ``compare_one_shot``: also serve the same forget facts as ONE
    request (step budget ``steps * requests``) and report it beside the sequential run.
    ``retain_model``: in the fine-tuned phase, also fine-tune a *retain model* (the same
    recipe without the forget facts) and report each method's TOFU/MUSE metrics against it at
    the end of its run (``unlearnopt.eval.tofu_metrics``).
    Evaluation: ``nonmember_size`` never-seen facts (membership inference),
    ``diversity_prompts`` greedy generations of ``max_new_tokens``, batches of
    ``eval_batch_size``.
    """

    methods: Sequence[str] = ("ga", "mollm")
    phases: Sequence[str] = ("pretrained",)
    requests: int = 5
    forget_size: int = 10
    retain_size: int = 40
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    retain_batch_size: int = 8
    forget_target: float = 0.0
    stop_at_target: bool = True
    replay: bool = True
    fresh_optimizer: bool = True
    focus: str = "spread"
    retain_model: bool = True
    retain_same_relation: float = 0.0
    compare_one_shot: bool = False
    seed: int = 0
    # per method: the method's options, plus "lr" to give that method its own learning rate
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM
    finetune_entities: int = 20
    finetune_lr: float = 1e-4
    finetune_epochs: int = 8
    nonmember_size: int = 20
    diversity_prompts: int = 8
    max_new_tokens: int = 16
    eval_batch_size: int = 32
    progress: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        from unlearnopt.methods import available_methods

        if not self.methods:
            raise ValueError("methods must name at least one method")
        known = set(available_methods()) | set(EDIT_METHODS)
        for m in self.methods:
            if m not in known:
                raise ValueError(f"unknown method {m!r}; available: {sorted(known)}")
        for p in self.phases:
            if p not in PHASES:
                raise ValueError(f"unknown phase {p!r}; expected some of {PHASES}")
        if self.focus not in FOCUS:
            raise ValueError(f"unknown focus {self.focus!r}; expected one of {FOCUS}")
        for name in ("requests", "forget_size", "retain_size", "steps", "retain_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.forget_size < self.requests:
            raise ValueError(
                f"forget_size ({self.forget_size}) must be >= requests "
                f"({self.requests}): every request needs a fact"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        same_relation_share(self.retain_same_relation)
        for m, opts in self.method_options.items():
            lr = opts.get("lr", 1.0)
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(
                    f"method_options[{m!r}]['lr'] must be a positive number, got {lr!r}"
                )


def method_settings(cfg: PulseConfig, method: str) -> dict[str, Any]:
    """``{"lr": ..., **options}`` for ``method``: ``cfg.lr``, then the tuned settings of
    ``unlearnopt.training``, then ``cfg.method_options`` (the later wins)."""
    return tuned_settings(method, cfg.lr, cfg.method_options.get(method))


__all__ = ["EDIT_METHODS", "FOCUS", "PHASES", "PulseConfig", "method_settings"]
