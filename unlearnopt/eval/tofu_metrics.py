"""The metrics unlearning papers report (TOFU, MUSE, open-unlearning), as plain functions.

Notation: for a prompt x and an answer y of |y| tokens, P(y|x) is the product of the answer
tokens' probabilities and ``P̄(y|x) = P(y|x) ** (1/|y|)`` its per-token geometric mean.

- **Truth ratio** (TOFU, Maini et al., 2024), per fact, with ỹ the correct answer (TOFU uses
  a paraphrase of it) and ŷ_1..ŷ_k wrong answers::

      R = mean_j P̄(ŷ_j|x) / P̄(ỹ|x)

  R < 1: the model prefers the truth. Utility uses ``max(0, 1 - R)`` on retained facts.
- **Forget quality** (TOFU): the p-value of the two-sample Kolmogorov-Smirnov test between
  the truth ratios of the forget facts under the unlearned model and under a *retain model*
  (the same fine-tuning without the forget facts). High (near 1) = indistinguishable from
  never having learned them; the TOFU paper reads p > 0.05 as forgotten.
- **Model utility** (TOFU): the harmonic mean of the per-set scores on retained knowledge:
  answer probability P̄, ROUGE-L recall of the greedy answer, and ``max(0, 1 - R)``, each on
  the retain facts and on the neighbour facts (TOFU uses retain, real-author and world-fact
  sets; our neighbours are the related facts never trained on). 0 if any score is 0.
- **ROUGE-L recall**: LCS(prediction, reference) / |reference| over lower-cased whitespace
  words (no stemming; TOFU's rouge_score applies a stemmer).
- **Privacy leakage** (MUSE, Shi et al., 2024)::

      privleak = (AUC_unlearned - AUC_retain) / AUC_retain

  with AUC the membership-inference AUC (here loss-based, forget vs never-seen facts) under
  the unlearned model and under the retain model. 0 = as private as never training on the
  facts; > 0 under-unlearning, < 0 over-unlearning. MUSE prints it in percent (x 100).
- **Exact memorisation** (Tirumala et al., 2022; open-unlearning)::

      EM = (1/|y|) sum_t 1[argmax_v p(v | x, y_<t) = y_t]      (teacher forcing)

- **Extraction strength** (Carlini et al., 2021, as in open-unlearning)::

      ES = 1 - k*/|y|,   k* = min{k : the greedy continuation of x, y_<=k is y_>k}

  i.e. the shortest answer prefix that lets greedy decoding produce the rest; with teacher
  forcing, k* is the length of the prefix left once the longest run of correct greedy tokens
  at the answer's end is removed (k* = |y| when the last token is wrong: ES = 0; ES = 1 when
  every token is predicted).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from unlearnopt.data import Fact
from unlearnopt.eval.metrics import encode_qa, membership_auc
from unlearnopt.objectives.shift import IGNORE_INDEX

__all__ = [
    "TOFU_METRIC_NAMES",
    "answer_token_hits",
    "exact_memorization",
    "extraction_strength",
    "forget_quality",
    "harmonic_mean",
    "membership_privacy_leakage",
    "model_utility",
    "privacy_leakage",
    "retain_reference",
    "rouge_l_recall",
    "tofu_metrics",
    "truth_ratio",
    "truth_ratios",
    "wrong_answers",
]


# --------------------------------------------------------------------------- pure formulas


def truth_ratio(correct_mean_logp: float, wrong_mean_logp: Sequence[float]) -> float:
    """``R = mean_j exp(wrong_j) / exp(correct)`` from per-token mean log-probabilities
    (log P̄). Raises ValueError without wrong answers."""
    wrong = np.asarray(wrong_mean_logp, dtype=np.float64)
    if wrong.size == 0:
        raise ValueError("wrong_mean_logp must hold at least one wrong answer's log P̄")
    return float(np.exp(wrong).mean() / np.exp(float(correct_mean_logp)))


def forget_quality(unlearned_ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """KS two-sample p-value between the forget facts' truth ratios under the unlearned
    model and under the retain model (scipy.stats.ks_2samp, two-sided)."""
    from scipy.stats import ks_2samp

    a, b = np.asarray(unlearned_ratios, float), np.asarray(retain_ratios, float)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs truth ratios from both models")
    return float(ks_2samp(a, b).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """``n / sum(1/v)``; 0 when any value is 0; ValueError on a negative value or none."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or (v < 0).any() or np.isnan(v).any():
        raise ValueError(f"harmonic_mean needs non-negative values, got {list(values)!r}")
    if (v == 0).any():
        return 0.0
    return float(v.size / (1.0 / v).sum())


def model_utility(
    prob: Sequence[float], rouge: Sequence[float], truth_ratio_score: Sequence[float]
) -> float:
    """Harmonic mean of every per-set score (one entry per set in each argument): answer
    probability P̄, ROUGE-L recall, and ``max(0, 1 - R)`` (the mean over a set's facts)."""
    return harmonic_mean([*prob, *rouge, *truth_ratio_score])


def privacy_leakage(auc_unlearned: float, auc_retain: float) -> float:
    """``(AUC_unlearned - AUC_retain) / AUC_retain`` (MUSE's PrivLeak as a fraction)."""
    if not auc_retain > 0:
        raise ValueError(f"auc_retain must be positive, got {auc_retain!r}")
    return float((auc_unlearned - auc_retain) / auc_retain)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """LCS of the lower-cased whitespace words / the reference's word count (0 for an empty
    reference)."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not ref:
        return 0.0
    prev = [0] * (len(pred) + 1)
    for r in ref:
        cur = [0]
        for j, p in enumerate(pred):
            cur.append(prev[j] + 1 if r == p else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(ref)


def exact_memorization(hits: Sequence[bool]) -> float:
    """Fraction of the answer's tokens that greedy decoding predicts under teacher forcing."""
    h = np.asarray(hits, dtype=bool)
    if h.size == 0:
        raise ValueError("exact_memorization needs at least one answer token")
    return float(h.mean())


def extraction_strength(hits: Sequence[bool]) -> float:
    """``1 - k*/|y|`` with k* the answer tokens left after removing the longest run of
    correctly predicted tokens at the end (see the module docstring)."""
    h = np.asarray(hits, dtype=bool)
    if h.size == 0:
        raise ValueError("extraction_strength needs at least one answer token")
    suffix = 0
    for hit in h[::-1]:
        if not hit:
            break
        suffix += 1
    return float(suffix / h.size)


# --------------------------------------------------------------------------- on a model


@torch.no_grad()
def _answer_rows(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per pair: (answer tokens' log-probabilities, greedy hits), numpy ``[|y|]`` each."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        for s in range(0, len(prompts), batch_size):
            batch = encode_qa(
                tokenizer, prompts[s : s + batch_size], answers[s : s + batch_size], device
            )
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits[:, :-1]
                .float()
            )
            target = batch["labels"][:, 1:]
            valid = target != IGNORE_INDEX
            safe = target.clamp_min(0)
            logp = logits.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            hits = logits.argmax(-1) == safe
            for i in range(target.shape[0]):
                m = valid[i]
                out.append((logp[i][m].double().cpu().numpy(), hits[i][m].cpu().numpy()))
    finally:
        model.train(was_training)
    return out


def answer_token_hits(model, tokenizer, facts: Sequence[Fact]) -> list[np.ndarray]:
    """Per fact, ``[|y|]`` bool: greedy prediction == answer token (teacher forcing); feed
    each to :func:`exact_memorization` / :func:`extraction_strength`."""
    rows = _answer_rows(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
    return [hits for _, hits in rows]


def wrong_answers(fact: Fact, pool: Sequence[Fact], k: int = 5, seed: int = 0) -> list[str]:
    """Up to ``k`` wrong answers for ``fact``: other answers of the same relation in
    ``pool`` (seeded draw), the analogue of TOFU's perturbed answers."""
    others = sorted(
        {f.answer for f in pool if f.relation == fact.relation and f.answer != fact.answer}
    )
    rng = random.Random(f"{seed}:{fact.id or fact.prompt}")
    return rng.sample(others, min(k, len(others)))


def truth_ratios(
    model, tokenizer, facts: Sequence[Fact], pool: Sequence[Fact], *, k: int = 5, seed: int = 0
) -> np.ndarray:
    """``[len(facts)]`` truth ratios R (NaN for a fact without a wrong answer in ``pool``);
    the correct answer is the fact's own answer (our facts have no paraphrased answers)."""
    prompts, answers, owner = [], [], []
    for i, f in enumerate(facts):
        for a in [f.answer, *wrong_answers(f, pool, k, seed)]:
            prompts.append(f.prompt)
            answers.append(a)
            owner.append(i)
    rows = _answer_rows(model, tokenizer, prompts, answers)
    per_fact: list[list[float]] = [[] for _ in facts]
    for i, (logp, _) in zip(owner, rows):
        per_fact[i].append(float(logp.mean()) if logp.size else float("-inf"))
    return np.array([truth_ratio(v[0], v[1:]) if len(v) > 1 else float("nan") for v in per_fact])


def membership_privacy_leakage(
    member_loss_unlearned: Sequence[float],
    nonmember_loss_unlearned: Sequence[float],
    member_loss_retain: Sequence[float],
    nonmember_loss_retain: Sequence[float],
) -> float:
    """:func:`privacy_leakage` of the loss-based MIA AUCs of the two models."""
    return privacy_leakage(
        membership_auc(member_loss_unlearned, nonmember_loss_unlearned),
        membership_auc(member_loss_retain, nonmember_loss_retain),
    )


# --------------------------------------------------------------------------- against a retain model

TOFU_METRIC_NAMES = (
    "forget_quality",
    "model_utility",
    "privleak",
    "extraction_strength",
    "exact_memorization",
)


def _mean_tr_score(ratios: np.ndarray) -> float:
    r = ratios[~np.isnan(ratios)]
    return float(np.maximum(0.0, 1.0 - r).mean()) if r.size else float("nan")


def retain_reference(
    retain_model,
    tokenizer,
    forget: Sequence[Fact],
    nonmember: Sequence[Fact],
    pool: Sequence[Fact],
    *,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """What the comparison needs from the retain model, computed once: the forget facts'
    truth ratios and the answer losses of the forget and never-seen facts."""
    from unlearnopt.eval.metrics import score_answers

    def losses(facts):
        return score_answers(
            retain_model,
            tokenizer,
            [f.prompt for f in facts],
            [f.answer for f in facts],
            batch_size=batch_size,
        ).loss

    return {
        "truth_ratios": truth_ratios(retain_model, tokenizer, forget, pool),
        "member_loss": losses(forget),
        "nonmember_loss": losses(nonmember),
    }


def tofu_metrics(
    model,
    tokenizer,
    reference: dict[str, np.ndarray],
    *,
    forget: Sequence[Fact],
    retain: Sequence[Fact],
    neighbour: Sequence[Fact],
    nonmember: Sequence[Fact],
    pool: Sequence[Fact],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> dict[str, float]:
    """The :data:`TOFU_METRIC_NAMES` of ``model`` against the retain model's ``reference``
    (:func:`retain_reference`); formulas in the module docstring. Model utility uses the
    retain and neighbour facts (a set without facts is left out)."""
    from unlearnopt.eval.metrics import generate_greedy, score_answers

    def scores(facts):
        return score_answers(
            model,
            tokenizer,
            [f.prompt for f in facts],
            [f.answer for f in facts],
            batch_size=batch_size,
        )

    tr = truth_ratios(model, tokenizer, forget, pool)
    ok, ok_ref = tr[~np.isnan(tr)], reference["truth_ratios"][~np.isnan(reference["truth_ratios"])]
    fq = forget_quality(ok, ok_ref) if ok.size and ok_ref.size else float("nan")
    prob, rouge, trs = [], [], []
    for facts in (retain, neighbour):
        if not facts:
            continue
        prob.append(float(scores(facts).prob.mean()))
        gens = generate_greedy(
            model, tokenizer, [f.prompt for f in facts], max_new_tokens=max_new_tokens
        )
        rouge.append(
            float(
                np.mean(
                    [rouge_l_recall(tokenizer.decode(g), f.answer) for g, f in zip(gens, facts)]
                )
            )
        )
        trs.append(_mean_tr_score(truth_ratios(model, tokenizer, facts, pool)))
    trs = [t for t in trs if not np.isnan(t)]
    utility = model_utility(prob, rouge, trs) if prob else float("nan")
    leak = membership_privacy_leakage(
        scores(forget).loss,
        scores(nonmember).loss,
        reference["member_loss"],
        reference["nonmember_loss"],
    )
    hits = answer_token_hits(model, tokenizer, forget)
    return {
        "forget_quality": fq,
        "model_utility": utility,
        "privleak": leak,
        "extraction_strength": float(np.mean([extraction_strength(h) for h in hits])),
        "exact_memorization": float(np.mean([exact_memorization(h) for h in hits])),
    }
