"""Prompt -> answer pairs as batches, and a model's answers to them scored.

Answers are scored by teacher forcing: the model reads ``prompt + " " + answer`` once and we look
at the answer tokens.

- *exact match* (accuracy): every answer token is the model's argmax given the tokens before it,
  which is the same as "greedy decoding from the prompt starts with the answer";
- *answer probability*: the geometric mean of the answer tokens' probabilities,
  ``exp(mean_t log p(y_t | prefix))``, so answers of 1 and 3 tokens are comparable;
- *answer loss*: ``-mean_t log p(y_t | prefix)`` (the membership-inference score).

Both the training loop (which encodes and checks facts) and the evaluation use these, so they
sit below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from unlearnopt.data import Fact

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- batching


def encode_qa(
    tokenizer, prompts: Sequence[str], answers: Sequence[str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Hugging Face batch for prompt -> answer pairs, loss on the answer tokens only.

    Returns ``input_ids`` and ``attention_mask`` ``[B, T]`` int64 (right-padded) and ``labels``
    ``[B, T]`` int64, equal to ``input_ids`` on the answer tokens and ``-100`` elsewhere (the
    model shifts labels itself). The answer is tokenized with a leading space and without
    special tokens, so its tokens are the ones the model would generate after the prompt.
    """
    if len(prompts) != len(answers):
        raise ValueError(
            f"prompts and answers must have the same length, got {len(prompts)} and {len(answers)}"
        )
    if not prompts:
        raise ValueError("encode_qa needs at least one prompt")
    seqs, labs = [], []
    for p, a in zip(prompts, answers):
        p_ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        a_ids = tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"]
        if not a_ids:
            raise ValueError(f"answer {a!r} tokenizes to nothing")
        seqs.append(list(p_ids) + list(a_ids))
        labs.append([IGNORE_INDEX] * len(p_ids) + list(a_ids))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def encode_facts(
    tokenizer,
    facts: Sequence[Fact],
    device: torch.device | str = "cpu",
    include_paraphrases: bool = False,
) -> dict[str, torch.Tensor]:
    """``encode_qa`` on facts' prompts (and, optionally, their paraphrases) and answers."""
    prompts, answers = [], []
    for f in facts:
        for p in (f.prompt, *f.paraphrases) if include_paraphrases else (f.prompt,):
            prompts.append(p)
            answers.append(f.answer)
    return encode_qa(tokenizer, prompts, answers, device)


def encode_texts(
    tokenizer, texts: Sequence[str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-padded language-modelling batch: loss on every real token."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = IGNORE_INDEX
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": enc["attention_mask"].to(device),
        "labels": labels.to(device),
    }


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- scoring


@dataclass
class AnswerScores:
    """Per-example answer scores, all ``[B]`` numpy arrays (float64 / bool)."""

    exact: np.ndarray
    prob: np.ndarray
    loss: np.ndarray


@torch.no_grad()
def _score_batch(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    valid = target != IGNORE_INDEX
    safe = target.clamp_min(0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    hit = logits.argmax(-1) == safe
    n = valid.sum(1).clamp_min(1)
    mean_logp = (logp * valid).sum(1) / n
    exact = (hit | ~valid).all(1)
    return exact, mean_logp.exp(), -mean_logp


def score_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 32,
    progress: tqdm | None = None,
) -> AnswerScores:
    """Exact match, answer probability and answer loss for each prompt -> answer pair.

    Pairs are scored in batches of ``batch_size`` sorted by length (less padding); the result
    is in the input order.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    n = len(prompts)
    exact = np.zeros(n, dtype=bool)
    prob = np.zeros(n)
    loss = np.zeros(n)
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(answers[i]))
    try:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = encode_qa(
                tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], device
            )
            e, p, lo = _score_batch(model, batch)
            exact[idx] = e.cpu().numpy()
            prob[idx] = p.double().cpu().numpy()
            loss[idx] = lo.double().cpu().numpy()
            if progress is not None:
                progress.update(len(idx))
    finally:
        model.train(was_training)
    return AnswerScores(exact, prob, loss)
