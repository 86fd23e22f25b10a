"""Driving an unlearning run on prompt -> answer facts, shared by ``unlearnopt run`` and PULSE.

- :class:`UnlearningRun`: one method's unlearning of a model (AdamW + ``MultiObjectiveUnlearner``);
  ``step(forget_facts)`` takes one step on the forget facts and a fresh random retain batch.
  How facts become training batches is the method's business (:meth:`Method.fact_batches`),
  so a method that trains on constructed targets needs no special case here.
- :func:`finetune`: teaches facts to a model (the fine-tuned phase of PULSE, and the tests'
  tiny models).
- The measured defaults: :data:`DEFAULT_LR`, :data:`DEFAULT_STEPS` and per-method
  :data:`TUNED_METHOD_OPTIONS`, combined by :func:`tuned_settings`. They live here only; the
  CLI and :class:`~unlearnopt.eval.pulse.PulseConfig` read them from this module.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unlearnopt.data import Fact

# AdamW learning rate and step budget per request, measured on SmolLM2-135M with the shipped
# facts (docs/real_model_results.md): at lr 1e-5 mollm forgets each 2-fact request in 1-8
# steps keeping retain accuracy >= 0.9 and neighbours >= 0.88.
DEFAULT_LR = 1e-5
DEFAULT_STEPS = 8
DEFAULT_MAX_GRAD_NORM = 1.0

# Per-method settings that differ from the defaults, measured on SmolLM2-135M
# (docs/real_model_results.md); "lr" is the method's own AdamW learning rate. SIU learns a new
# answer (an invented substitute) rather than pushing one down, and needs a larger step: at
# lr 1e-5 it had not forgotten a 2-fact request after 8 steps.
TUNED_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"siu": {"lr": 3e-5}}


def tuned_settings(
    method: str, lr: float, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``{"lr": ..., **options}`` for ``method``: ``lr``, then :data:`TUNED_METHOD_OPTIONS`,
    then ``overrides`` (the later wins)."""
    return {"lr": lr, **TUNED_METHOD_OPTIONS.get(method, {}), **dict(overrides or {})}


def sample(facts: Sequence[Fact], k: int, rng: random.Random) -> list[Fact]:
    """``k`` facts drawn without replacement (all of them, in order, when there are <= k)."""
    return list(facts) if len(facts) <= k else rng.sample(list(facts), k)


def model_vocab_size(model) -> int:
    """Rows of the model's output embedding (its logits' last dimension)."""
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


def fact_texts(facts: Sequence[Fact]) -> list[str]:
    """Every prompt, paraphrase and answer of ``facts`` (what training and scoring tokenize)."""
    return [t for f in facts for t in (f.prompt, *f.paraphrases, " " + f.answer)]


def check_vocabulary(model, tokenizer, texts: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` if the tokenizer maps some text (a prompt, an answer) to a token id
    outside the model's input embedding (a tokenizer that does not belong to the model);
    ``what`` names the data in the message."""
    emb = model.get_input_embeddings()
    rows = int(emb.weight.shape[0]) if emb is not None else int(model.config.vocab_size)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if ids and max(ids) >= rows:
            raise ValueError(
                f"{what}: {text!r} tokenizes to id {max(ids)}, outside the "
                f"model's vocabulary of {rows} tokens (does the tokenizer belong "
                "to this model?)"
            )


def same_relation_share(value) -> float:
    """``retain_same_relation`` as a share in [0, 1]: a bool means 0.5 (True) or 0 (False)."""
    if isinstance(value, bool):
        return 0.5 if value else 0.0
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"retain_same_relation must be a share in [0, 1], got {value!r}")
    return float(value)


class UnlearningRun:
    """One method's unlearning of a model: holds the optimizer and ``MultiObjectiveUnlearner``
    (sequential requests continue their state unless :meth:`restart` is called).

    Args:
        model: a Hugging Face causal LM, trained in place.
        tokenizer: its tokenizer.
        method: a registered method name.
        ref_model: the frozen original, for methods that need one (else None).
        retain: the retain facts; each step draws ``retain_batch_size`` of them (seeded).
        lr: AdamW learning rate (no weight decay).
        max_grad_norm: clipping of the combined update (None: no clipping).
        options: the method's options.
        retain_same_relation: the share (in [0, 1]) of each step's retain batch drawn from
            the retain facts that share a relation with that step's forget facts (the rest
            from the others; ``True`` means 0.5); 0 or False: drawn uniformly from all retain
            facts.
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: str,
        ref_model,
        retain: Sequence[Fact],
        *,
        lr: float,
        retain_batch_size: int,
        seed: int = 0,
        max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM,
        options: dict | None = None,
        retain_same_relation: float = 0.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.ref_model = ref_model
        self.lr = lr
        self.max_grad_norm = max_grad_norm
        self.options = dict(options or {})
        self.retain = list(retain)
        self.retain_batch_size = retain_batch_size
        self.retain_same_relation = same_relation_share(retain_same_relation)
        self.rng = random.Random(seed)
        self.device = next(model.parameters()).device
        self.vocab_size = model_vocab_size(model)
        self.restart()
        self.steps = 0

    def restart(self) -> None:
        """A new optimizer and unlearner (method state) on the model as it is now."""
        from unlearnopt.unlearner import MultiObjectiveUnlearner

        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0
        )
        self.unlearner = MultiObjectiveUnlearner(
            self.model,
            self.optimizer,
            method=self.method,
            ref_model=self.ref_model,
            max_grad_norm=self.max_grad_norm,
            **self.options,
        )

    def _encode(self, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
        from unlearnopt.answers import encode_qa

        return encode_qa(self.tokenizer, prompts, answers, self.device)

    def retain_batch(self, forget: Sequence[Fact]) -> list[Fact]:
        """The retain facts of the next step (seeded draw, see ``retain_same_relation``)."""
        k = self.retain_batch_size
        if not self.retain_same_relation:
            return sample(self.retain, k, self.rng)
        relations = {f.relation for f in forget}
        same = [f for f in self.retain if f.relation in relations]
        other = [f for f in self.retain if f.relation not in relations]
        wanted = max(round(k * self.retain_same_relation), 1)
        chosen = sample(same, min(len(same), wanted), self.rng)
        chosen += sample(other, k - len(chosen), self.rng)
        if len(chosen) < k:  # too few other facts: fill up with more of the same relations
            left = [f for f in same if f not in chosen]
            chosen += sample(left, k - len(chosen), self.rng)
        return chosen

    def step(self, forget: Sequence[Fact]) -> dict[str, float]:
        """One optimizer step on ``forget`` and a fresh random retain batch; the step's stats."""
        self.model.train()
        retain = self.retain_batch(forget)
        fb, rb = self.unlearner.method.fact_batches(
            forget,
            retain,
            encode=self._encode,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
        )
        stats = self.unlearner.step(forget=fb, retain=rb)
        self.steps += 1
        return stats


def finetune(
    model,
    tokenizer,
    facts: Sequence[Fact],
    *,
    lr: float = 1e-4,
    epochs: int = 8,
    batch_size: int = 16,
    target_acc: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Teach ``facts`` to ``model`` (cross-entropy on the answer tokens, AdamW, shuffled batches,
    gradient clipping at 1) until ``target_acc`` of them are answered exactly or ``epochs``
    epochs; returns ``{"finetune_steps", "finetune_acc"}``."""
    from tqdm.auto import tqdm

    from unlearnopt.answers import encode_facts, score_answers

    rng = random.Random(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    steps, acc = 0, 0.0
    bar = tqdm(range(epochs), desc="fine-tune", leave=False, disable=not progress)
    for _ in bar:
        order = list(facts)
        rng.shuffle(order)
        model.train()
        for i in range(0, len(order), batch_size):
            batch = encode_facts(tokenizer, order[i : i + batch_size], device)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
        s = score_answers(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
        acc = float(s.exact.mean())
        bar.set_postfix(acc=f"{acc:.2f}")
        if acc >= target_acc:
            break
    opt.zero_grad(set_to_none=True)
    model.eval()
    return {"finetune_steps": steps, "finetune_acc": acc}


__all__ = [
    "DEFAULT_LR",
    "DEFAULT_MAX_GRAD_NORM",
    "DEFAULT_STEPS",
    "TUNED_METHOD_OPTIONS",
    "UnlearningRun",
    "check_vocabulary",
    "fact_texts",
    "finetune",
    "model_vocab_size",
    "sample",
    "tuned_settings",
]
