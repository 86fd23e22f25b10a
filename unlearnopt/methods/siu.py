"""SIU: single-image unlearning with constructed targets and a dual masked KL (arXiv 2405.12523).

On the constructed batch of :func:`~unlearnopt.methods.siu_targets.
build_siu_targets` (passed as ``forget``),

    L = α · CE + β · DMK                      (paper: α = 0.9, β = 0.75)

- CE (objective ``siu_ce``): ``nll`` on every answer token of the four aims, mean over the
  labelled (shifted) tokens: ``F.cross_entropy(logits[:, :-1].flatten(0, 1),
  labels[:, 1:].flatten(), ignore_index=-100)``.
- DMK (objective ``siu_dmk``): ``sum_t m_t sum_v u_v q_v (log q_v − log p_v) / #(m_t = 1)``
  with q the frozen original's next-token distribution, p the model's, m = ``token_mask``
  shifted like the labels (so m_t is the mask of the token position t predicts) and
  u = ``vocab_mask`` (no renormalisation). Forward KL by default (``direction``).

Their gradients are combined as the weighted sum α·g_CE + β·g_DMK (``FixedWeights``), then
the wrapped optimizer steps. The batch's ``token_mask`` / ``vocab_mask`` / ``siu_aim`` are
not model inputs: :meth:`SIU.step_recipe` strips them before the unlearner sees the batch and the
objectives read them back (so any model forward works). A batch without ``token_mask``
uses every labelled token; without ``vocab_mask``, no vocabulary masking (plain KL).

Requires the frozen original (``ref_model=`` or a PEFT model). No retain batch is needed:
aim (4) of the constructed batch is the retain signal; a retain batch passed to ``step()``
is ignored.

Defaults: the paper's α = 0.9, β = 0.75. With PULSE's constructed batches (each forget
prompt answered with an invented word of its own) on SmolLM2-135M, AdamW at lr 3e-5 forgets
a request within a few steps; the measurements are in docs/method_measurements.md.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.contract import Objective, ObjectiveContext, StepRecipe, StepTools
from unlearnopt.methods.base import Method
from unlearnopt.methods.registry import register_method
from unlearnopt.methods.siu_targets import AIM_ALIGN, AIM_PRESERVE, model_inputs

DIRECTIONS = ("forward", "reverse")
# What SIU answers to a forgotten fact's prompt when it trains on facts (aim 1, "align with an
# unseen concept"): an invented word per fact, picked by a stable hash of the fact's id. One
# shared word such as "unknown" teaches the relation ("the currency of X is the unknown") and
# spreads to the facts of the same relation that were not asked to be forgotten.
SUBSTITUTES = (
    "Zorvel",
    "Mirtan",
    "Quessa",
    "Brodan",
    "Velkin",
    "Tarsio",
    "Odrune",
    "Faxley",
    "Nimbrel",
    "Corvath",
    "Ulvena",
    "Presk",
    "Hadrel",
    "Isomar",
    "Kettrin",
    "Wolmar",
)


def substitute_answer(fact) -> str:
    """The invented answer SIU trains ``fact``'s prompt towards (stable across runs)."""
    return SUBSTITUTES[zlib.crc32(fact.id.encode()) % len(SUBSTITUTES)]


def _shift_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` mask in the labels' frame -> the logits' frame (position t predicts t + 1)."""
    pad = torch.zeros_like(mask[:, :1])
    return torch.cat([mask[:, 1:], pad], dim=1)


def _split_rows(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Micro-batches of an SIU batch: row-indexed tensors split along dim 0, ``vocab_mask``
    shared."""
    size = batch["labels"].shape[0]
    if size < parts:
        raise ValueError(f"forget has batch size {size}, fewer than accumulate={parts}")
    pixels = batch.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.shape[0] != size:
        raise ValueError(
            f"forget['pixel_values'] has {pixels.shape[0]} images for {size} rows; "
            "splitting into micro-batches (accumulate > 1) needs one image per row "
            "(pass a list of micro-batches instead)"
        )
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    out = []
    for a, b in itertools.pairwise(bounds):
        out.append(
            {
                k: (
                    v
                    if k == "vocab_mask" or not isinstance(v, torch.Tensor) or v.dim() == 0
                    else v[a:b]
                )
                for k, v in batch.items()
            }
        )
    return out


class SIU(Method):
    """SIU's objective, α·CE + β·DMK on the constructed batch (module docstring).

    Options:
        alpha: weight of the cross-entropy on the constructed targets (paper: 0.9).
        beta: weight of the dual masked KL (paper: 0.75).
        direction: ``"forward"`` KL(p_ref || p_θ) (default) or ``"reverse"``.
        temperature: softmax temperature of both distributions in the KL (default 1).
    """

    name = "siu"
    defaults: ClassVar[Mapping[str, Any]] = {
        "alpha": 0.9,
        "beta": 0.75,
        "direction": "forward",
        "temperature": 1.0,
    }
    needs_ref = True

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        # Masks of the micro-batches of the step in progress, keyed by id() of the stripped
        # dict the unlearner hands to the objectives (alive for the whole step).
        self._masks: dict[
            int, tuple[Mapping[str, Any], torch.Tensor | None, torch.Tensor | None]
        ] = {}

    def validate_config(self) -> None:
        c = self.config
        for key in ("alpha", "beta", "temperature"):
            v = c[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"siu: {key} must be a finite number, got {v!r}")
        if c["alpha"] < 0 or c["beta"] < 0:
            raise ValueError(
                f"siu: alpha and beta must be >= 0, got alpha={c['alpha']!r}, beta={c['beta']!r}"
            )
        if c["temperature"] <= 0:
            raise ValueError(f"siu: temperature must be > 0, got {c['temperature']!r}")
        if c["direction"] not in DIRECTIONS:
            raise ValueError(f"siu: direction must be one of {DIRECTIONS}, got {c['direction']!r}")

    @property
    def needs_retain(self) -> bool:
        return False

    # -- masks ----------------------------------------------------------------------------------
    def _lookup(self, batch: Mapping[str, Any]):
        """``(token_mask [B, T] in the logits' frame, vocab_mask [V] | None)`` of a micro-batch."""
        entry = self._masks.get(id(batch))
        if entry is not None and entry[0] is batch:
            _, token_mask, vocab_mask = entry
        else:  # a batch that did not go through step() (e.g. the user's own loop)
            token_mask, vocab_mask = batch.get("token_mask"), batch.get("vocab_mask")
        labels = batch["labels"]
        if token_mask is None:
            token_mask = labels != -100
        if tuple(token_mask.shape) != tuple(labels.shape):
            raise ValueError(
                f"token_mask has shape {tuple(token_mask.shape)}, expected the "
                f"labels' {tuple(labels.shape)}"
            )
        return _shift_mask(token_mask.to(labels.device)), vocab_mask

    def _ce(self, ctx: ObjectiveContext) -> torch.Tensor:
        from unlearnopt.objectives import token_loss_of

        return token_loss_of(ctx, "nll")

    def _dmk(self, ctx: ObjectiveContext) -> torch.Tensor:
        from unlearnopt.objectives import masked_kl_of, vocab_size_of

        token_mask, vocab_mask = self._lookup(ctx.batch)
        vocab = vocab_size_of(ctx)
        device = ctx.labels.device
        if vocab_mask is not None:
            if tuple(vocab_mask.shape) != (vocab,):
                raise ValueError(
                    f"vocab_mask has shape {tuple(vocab_mask.shape)} but the model's "
                    f"vocabulary is {vocab}; build it with vocab_size={vocab}"
                )
            vocab_mask = vocab_mask.to(device)
        return masked_kl_of(
            ctx,
            token_mask.to(device),
            vocab_mask,
            direction=self.config["direction"],
            temperature=float(self.config["temperature"]),
        )

    def _dmk_count(self, batch: Mapping[str, Any]) -> torch.Tensor:
        token_mask, _ = self._lookup(batch)
        return (token_mask != 0).sum()

    def fact_batches(
        self, forget: Sequence[Any], retain: Sequence[Any], *, encode, tokenizer, vocab_size: int
    ) -> tuple[dict, None]:
        """SIU's constructed batch for prompt -> answer facts, and no retain batch: forget
        prompts answered with :func:`substitute_answer` (aim 1, ``token_mask`` False), retain
        facts with their own answers (aim 4, ``token_mask`` True); ``vocab_mask`` ``[V]`` False
        on the token ids of the forget facts' real answers (with a leading space)."""
        facts = list(forget) + list(retain)
        answers = [substitute_answer(f) for f in forget] + [f.answer for f in retain]
        batch = encode([f.prompt for f in facts], answers)
        device = batch["labels"].device
        token_mask = batch["labels"] != -100
        token_mask[: len(forget)] = False
        vocab_mask = torch.ones(vocab_size, dtype=torch.bool, device=device)
        for f in forget:
            ids = tokenizer(" " + f.answer, add_special_tokens=False)["input_ids"]
            vocab_mask[torch.tensor(ids, dtype=torch.long, device=device)] = False
        batch["token_mask"] = token_mask
        batch["vocab_mask"] = vocab_mask
        batch["siu_aim"] = torch.tensor(
            [AIM_ALIGN] * len(forget) + [AIM_PRESERVE] * len(retain), device=device
        )
        return batch, None

    # -- the recipe -----------------------------------------------------------------------------
    def objectives(self) -> list[Objective]:
        return [
            Objective("siu_ce", "forget", self._ce),
            Objective("siu_dmk", "forget", self._dmk, count=self._dmk_count),
        ]

    def aggregator(self) -> Aggregator:
        return Aggregator(FixedWeights([float(self.config["alpha"]), float(self.config["beta"])]))

    def step_recipe(self) -> StepRecipe:
        return self._step

    def _step(self, tools: StepTools, forget, retain) -> dict[str, float]:
        """The standard step on the constructed batch, its masks kept aside (not model
        inputs) and split with its rows."""
        if forget is None:
            raise ValueError(
                "siu needs a forget batch (the constructed SIU batch, see "
                "unlearnopt.methods.siu_targets.build_siu_targets)"
            )
        if isinstance(forget, Mapping):
            parts = tools.accumulate
            micro = _split_rows(forget, parts) if parts > 1 else [forget]
        elif isinstance(forget, (list, tuple)):
            micro = list(forget)
        else:
            raise TypeError(
                f"forget must be a batch dict or a list of them, got {type(forget).__name__}"
            )
        stripped = []
        for mb in micro:
            if not isinstance(mb, Mapping):
                raise TypeError(f"forget micro-batches must be dicts, got {type(mb).__name__}")
            clean = model_inputs(mb)
            self._masks[id(clean)] = (clean, mb.get("token_mask"), mb.get("vocab_mask"))
            stripped.append(clean)
        try:
            # A list is used as given (no re-splitting), so the ids above stay valid.
            return tools.standard_step(self.objectives(), self.aggregator(), stripped, None)
        finally:
            self._masks.clear()


register_method("siu", SIU)
