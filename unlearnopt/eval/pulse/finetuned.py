"""PULSE's ``"finetuned"`` phase: fine-tuning on invented people (``finetuned_setup``) and the
TOFU metrics against a retain model fine-tuned without the forget facts
(``retain_model_metrics``)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

from unlearnopt.data import Fact
from unlearnopt.eval.pulse.config import PulseConfig
from unlearnopt.eval.pulse.splits import (
    Split,
    entity_of,
    entity_shuffled,
    known_facts,
    split_finetuned,
    split_focused,
)
from unlearnopt.training import finetune

TOFU_DOC = {
    "forget_quality": "KS-test p-value, forget-set truth ratios vs the retain model (higher = "
    "closer to never having learned them)",
    "model_utility": "harmonic mean of answer probability, ROUGE-L recall and truth-ratio "
    "score on the retain and neighbour facts",
    "privleak": "(MIA AUC - retain model's MIA AUC) / retain model's (0 = ideal)",
    "extraction_strength": "1 - shortest answer prefix that lets greedy decoding finish the "
    "answer / answer length, mean over forget facts (lower = better)",
    "exact_memorization": "fraction of forget answer tokens predicted greedily under teacher "
    "forcing (lower = better)",
}


def _tuned_facts(fictitious: Sequence[Fact], cfg: PulseConfig) -> list[Fact]:
    """The facts of the first ``cfg.finetune_entities`` invented people (seeded order)."""
    facts = entity_shuffled(fictitious, cfg.seed)
    entities = list(dict.fromkeys(entity_of(f) for f in facts))
    tuned_names = set(entities[: cfg.finetune_entities])
    return [f for f in facts if entity_of(f) in tuned_names]


def retain_model_metrics(
    model,
    base,
    tokenizer,
    fictitious: Sequence[Fact],
    split: Split,
    cfg: PulseConfig,
    log: Callable[[str], None],
) -> Callable[[Any], dict[str, float]]:
    """Fine-tune a retain model (a copy of the original ``model``, same recipe as ``base``,
    without the forget facts) and return ``tofu(model) -> metrics`` against it."""
    from unlearnopt.eval.tofu_metrics import retain_reference, tofu_metrics

    forget_ids = {f.id for f in split.forget}
    kept = [f for f in _tuned_facts(fictitious, cfg) if f.id not in forget_ids]
    retain_model = copy.deepcopy(model)
    retain_model.requires_grad_(True)
    ft = finetune(
        retain_model,
        tokenizer,
        kept,
        lr=cfg.finetune_lr,
        epochs=cfg.finetune_epochs,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    retain_model.eval()
    log(
        f"  retain model: fine-tuned on {len(kept)} facts (the forget facts left out), "
        f"accuracy {ft['finetune_acc']:.2f}"
    )
    pool = [*split.forget, *split.retain, *split.neighbour, *split.nonmember]
    reference = retain_reference(
        retain_model, tokenizer, split.forget, split.nonmember, pool, batch_size=cfg.eval_batch_size
    )
    del retain_model

    def tofu(unlearned) -> dict[str, float]:
        return tofu_metrics(
            unlearned,
            tokenizer,
            reference,
            forget=split.forget,
            retain=split.retain,
            neighbour=split.neighbour,
            nonmember=split.nonmember,
            pool=pool,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
        )

    return tofu


def finetuned_setup(
    model,
    tokenizer,
    real_facts: Sequence[Fact],
    fictitious: Sequence[Fact],
    cfg: PulseConfig,
    log: Callable[[str], None],
):
    """Fine-tune a copy of ``model`` on the first ``cfg.finetune_entities`` invented people
    (seeded order) and split what it learned; returns ``(fine-tuned model, split, info)``."""
    facts = entity_shuffled(fictitious, cfg.seed)
    entities = list(dict.fromkeys(entity_of(f) for f in facts))
    tuned_names = set(entities[: cfg.finetune_entities])
    tuned = [f for f in facts if entity_of(f) in tuned_names]
    unseen = [f for f in facts if entity_of(f) not in tuned_names]
    known_real = known_facts(model, tokenizer, real_facts, cfg.eval_batch_size)
    base = copy.deepcopy(model)
    base.requires_grad_(True)
    t0 = time.perf_counter()
    ft = finetune(
        base,
        tokenizer,
        tuned,
        lr=cfg.finetune_lr,
        epochs=cfg.finetune_epochs,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    ft["finetune_seconds"] = time.perf_counter() - t0
    log(
        f"  fine-tuned on {len(tuned)} facts about {len(tuned_names)} invented people: "
        f"{ft['finetune_steps']} steps, accuracy {ft['finetune_acc']:.2f}"
    )
    learned = known_facts(base, tokenizer, tuned, cfg.eval_batch_size)
    split = (
        split_finetuned(learned, known_real, unseen, cfg)
        if cfg.focus == "spread"
        else split_focused(learned, unseen, cfg)
    )
    base.eval()
    return base, split, ft


__all__ = ["TOFU_DOC", "finetuned_setup", "retain_model_metrics"]
