"""Unlearning metrics (as in PULSE, arXiv 2507.01271): efficacy, generality, retain,
neighbours, fluency, diversity and membership inference, batched, on any device.

Answers are scored by teacher forcing (exact match, answer probability, answer loss), as
defined in :mod:`unlearnopt.answers`, which this module re-exports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

# Re-exported: encoding and scoring answers are part of the metrics API.
from unlearnopt.answers import (
    IGNORE_INDEX,
    AnswerScores,
    _device_of,
    encode_facts,
    encode_qa,
    encode_texts,
    score_answers,
)
from unlearnopt.data import Fact


def fact_accuracy(
    model, tokenizer, facts: Sequence[Fact], *, paraphrases: bool = False, batch_size: int = 32
) -> float:
    """Fraction of facts answered exactly (greedy) from their prompt (or their paraphrases)."""
    prompts, answers = _pairs(facts, paraphrases)
    if not prompts:
        return float("nan")
    return float(
        score_answers(model, tokenizer, prompts, answers, batch_size=batch_size).exact.mean()
    )


def _pairs(facts: Iterable[Fact], paraphrases: bool) -> tuple[list[str], list[str]]:
    prompts, answers = [], []
    for f in facts:
        for p in f.paraphrases if paraphrases else (f.prompt,):
            prompts.append(p)
            answers.append(f.answer)
    return prompts, answers


@torch.no_grad()
def perplexity(
    model, tokenizer, texts: Sequence[str], *, batch_size: int = 16, progress: tqdm | None = None
) -> float:
    """Token-weighted perplexity ``exp(sum NLL / #predicted tokens)`` over ``texts``."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            batch = encode_texts(tokenizer, chunk, device)
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits[:, :-1]
                .float()
            )
            target = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                reduction="sum",
                ignore_index=IGNORE_INDEX,
            )
            total += float(nll)
            count += int((target != IGNORE_INDEX).sum())
            if progress is not None:
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    return float(np.exp(total / max(count, 1)))


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 16
) -> list[list[int]]:
    """Greedy continuations (token ids, stopped at EOS) of each prompt."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation needs the prompts flush right
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
            ).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out.append(row)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def unique_token_ratio(generations: Sequence[Sequence[int]]) -> float:
    """Mean over generations of ``#distinct tokens / #tokens`` (an empty generation scores 0).

    Degenerate unlearned models repeat themselves ("the the the ..."), which drives it to 0.
    """
    if not generations:
        return float("nan")
    return float(np.mean([len(set(g)) / len(g) if g else 0.0 for g in generations]))


def membership_auc(member_loss: Sequence[float], nonmember_loss: Sequence[float]) -> float:
    """Loss-based membership-inference AUC: P(loss(member) < loss(non-member)), ties count 1/2.

    1.0 means the forget samples are still recognisably "seen"; 0.5 means they look like data
    the model never saw, the goal of unlearning. (Mann-Whitney U statistic / (m n).)
    """
    a = np.asarray(member_loss, dtype=np.float64)
    b = np.asarray(nonmember_loss, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    less = (a[:, None] < b[None, :]).sum()
    ties = (a[:, None] == b[None, :]).sum()
    return float((less + 0.5 * ties) / (a.size * b.size))


# --------------------------------------------------------------------------- all metrics

METRIC_NAMES = (
    "forget_acc",
    "forget_prob",
    "general_acc",
    "general_prob",
    "retain_acc",
    "retain_prob",
    "neighbour_acc",
    "neighbour_prob",
    "ppl",
    "diversity",
    "mia_auc",
)

METRIC_DOC = {
    "forget_acc": "exact-match accuracy on the forget facts so far (lower = more forgotten)",
    "forget_prob": "mean answer probability on the forget facts so far",
    "general_acc": "exact-match accuracy on paraphrased forget prompts (generality)",
    "general_prob": "mean answer probability on paraphrased forget prompts",
    "retain_acc": "exact-match accuracy on the retain facts (used for training)",
    "retain_prob": "mean answer probability on the retain facts",
    "neighbour_acc": "exact-match accuracy on same-relation facts never trained on",
    "neighbour_prob": "mean answer probability on the neighbour facts",
    "ppl": "perplexity on neutral sentences (fluency; lower is better)",
    "diversity": "unique-token ratio of greedy generations (fluency; higher is better)",
    "mia_auc": "loss-based membership-inference AUC, forget vs never-seen facts (0.5 = unseen)",
}


# One display name per metric, used by the tables, the plots and the CLI alike; the arrow says
# which direction is better (MIA AUC is best at 0.5: the forgotten facts look never seen).
METRIC_LABELS = {
    "forget_acc": "forget acc ↓",
    "forget_prob": "forget prob ↓",
    "general_acc": "paraphrase acc ↓",
    "general_prob": "paraphrase prob ↓",
    "retain_acc": "retain acc ↑",
    "retain_prob": "retain prob ↑",
    "neighbour_acc": "neighbour acc ↑",
    "neighbour_prob": "neighbour prob ↑",
    "ppl": "perplexity ↓",
    "diversity": "diversity ↑",
    "mia_auc": "MIA AUC →0.5",
}

HOW_TO_READ = (
    "acc = exact-match accuracy (greedy answer); ↓ lower is better, ↑ higher is "
    "better; MIA AUC: 0.5 = the forgotten facts look never seen, 1.0 = still "
    "recognisable as trained on."
)


def evaluate(
    model,
    tokenizer,
    *,
    forget: Sequence[Fact],
    retain: Sequence[Fact] = (),
    neighbour: Sequence[Fact] = (),
    neutral: Sequence[str] = (),
    nonmember: Sequence[Fact] = (),
    diversity_prompts: Sequence[str] = (),
    max_new_tokens: int = 16,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, float]:
    """All PULSE metrics (see ``METRIC_DOC``) in one batched pass per kind; NaN where a set is
    empty. ``nonmember`` facts are the "never seen" side of the membership-inference AUC."""
    groups = {
        "forget": (forget, False),
        "general": (forget, True),
        "retain": (retain, False),
        "neighbour": (neighbour, False),
        "nonmember": (nonmember, False),
    }
    prompts, answers, slices = [], [], {}
    for name, (facts, para) in groups.items():
        p, a = _pairs(facts, para)
        slices[name] = slice(len(prompts), len(prompts) + len(p))
        prompts += p
        answers += a
    total = len(prompts) + len(neutral) + len(diversity_prompts)
    bar = tqdm(total=total, desc=desc, leave=False, disable=not progress, unit="seq")
    try:
        scores = (
            score_answers(model, tokenizer, prompts, answers, batch_size=batch_size, progress=bar)
            if prompts
            else AnswerScores(*(np.zeros(0),) * 3)
        )
        out: dict[str, float] = {}
        for name in ("forget", "general", "retain", "neighbour"):
            s = slices[name]
            ex, pr = scores.exact[s], scores.prob[s]
            out[f"{name}_acc"] = float(ex.mean()) if ex.size else float("nan")
            out[f"{name}_prob"] = float(pr.mean()) if pr.size else float("nan")
        out["ppl"] = (
            perplexity(model, tokenizer, neutral, batch_size=batch_size, progress=bar)
            if neutral
            else float("nan")
        )
        if diversity_prompts:
            gens = generate_greedy(
                model,
                tokenizer,
                diversity_prompts,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            bar.update(len(diversity_prompts))
            out["diversity"] = unique_token_ratio(gens)
        else:
            out["diversity"] = float("nan")
        out["mia_auc"] = membership_auc(
            scores.loss[slices["forget"]], scores.loss[slices["nonmember"]]
        )
    finally:
        bar.close()
    return out


__all__ = [
    "HOW_TO_READ",
    "IGNORE_INDEX",
    "METRIC_DOC",
    "METRIC_LABELS",
    "METRIC_NAMES",
    "AnswerScores",
    "encode_facts",
    "encode_qa",
    "encode_texts",
    "evaluate",
    "fact_accuracy",
    "generate_greedy",
    "membership_auc",
    "perplexity",
    "score_answers",
    "unique_token_ratio",
]
