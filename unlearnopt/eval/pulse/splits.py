"""PULSE's data splits: which facts are forgotten (in which request), retained, held out as
neighbours, and never seen (the non-members of membership inference).

Every split only forgets facts whose answer no other learned fact shares: forgetting "France is
on the continent of Europe" while "Norway ... Europe" stays a neighbour asks the model to keep
and drop the same answer to the same question, which measures the data split, not the method
(on SmolLM2-135M such pairs cost every method its neighbours).
"""

from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from unlearnopt.data import Fact
from unlearnopt.eval.metrics import score_answers
from unlearnopt.eval.pulse.config import PulseConfig
from unlearnopt.training import sample


@dataclass
class Split:
    """The facts of one phase: forget (in request order), retain, neighbour, never-seen."""

    forget: list[Fact]
    retain: list[Fact]
    neighbour: list[Fact]
    nonmember: list[Fact]
    requests: list[list[Fact]]

    def ids(self) -> dict[str, Any]:
        return {
            "forget_requests": [[f.id for f in r] for r in self.requests],
            "retain": [f.id for f in self.retain],
            "neighbour": [f.id for f in self.neighbour],
            "nonmember": [f.id for f in self.nonmember],
        }


def split_requests(facts: Sequence[Fact], requests: int) -> list[list[Fact]]:
    """``facts`` in ``requests`` consecutive chunks whose sizes differ by at most one."""
    bounds = [round(i * len(facts) / requests) for i in range(requests + 1)]
    return [list(facts[a:b]) for a, b in itertools.pairwise(bounds)]


def known_facts(model, tokenizer, facts: Sequence[Fact], batch_size: int = 32) -> list[Fact]:
    """The facts whose answer the model produces exactly (greedy) from the main prompt."""
    s = score_answers(
        model,
        tokenizer,
        [f.prompt for f in facts],
        [f.answer for f in facts],
        batch_size=batch_size,
    )
    return [f for f, ok in zip(facts, s.exact) if ok]


def answer_key(f: Fact) -> str:
    """The answer, case- and whitespace-normalised (facts with equal keys share an answer)."""
    return " ".join(f.answer.lower().split())


def entity_of(f: Fact) -> str:
    """The invented person (or subject) a fact is about."""
    return f.entity or f.subject or f.id


def entity_shuffled(fictitious: Sequence[Fact], seed: int) -> list[Fact]:
    """Fictitious facts with their entities in a seeded random order (facts of an entity
    stay together)."""
    entities: dict[str, list[Fact]] = {}
    for f in fictitious:
        entities.setdefault(entity_of(f), []).append(f)
    names = sorted(entities)
    random.Random(seed).shuffle(names)
    return [f for n in names for f in entities[n]]


def split_pretrained(
    known: Sequence[Fact], nonmember_pool: Sequence[Fact], cfg: PulseConfig
) -> Split:
    """Forget facts spread round-robin over the relations with at least 3 known facts;
    neighbours: half of the other known facts of those relations; retain: the rest."""
    rng = random.Random(cfg.seed)
    by_rel: dict[str, list[Fact]] = {}
    for f in known:
        by_rel.setdefault(f.relation, []).append(f)
    answers = collections.Counter(answer_key(f) for f in known)
    for facts in by_rel.values():
        rng.shuffle(facts)
        # facts with an answer of their own first: the forget facts are taken from the front
        facts.sort(key=lambda f: answers[answer_key(f)] > 1)
    rels = sorted(r for r, fs in by_rel.items() if len(fs) >= 3)
    rng.shuffle(rels)
    if not rels:
        raise ValueError("the model knows fewer than 3 facts of every relation; nothing to split")
    forget: list[Fact] = []
    taken = dict.fromkeys(rels, 0)
    while len(forget) < cfg.forget_size:
        progressed = False
        for r in rels:
            # leave at least 2 facts of a relation for neighbour/retain
            if (
                len(forget) < cfg.forget_size
                and taken[r] < len(by_rel[r]) - 2
                and answers[answer_key(by_rel[r][taken[r]])] == 1
            ):
                forget.append(by_rel[r][taken[r]])
                taken[r] += 1
                progressed = True
        if not progressed:
            break
    if len(forget) < cfg.requests:
        raise ValueError(
            f"only {len(forget)} known facts (with an answer no other known fact "
            f"shares) can be forgotten; need at least requests={cfg.requests}"
        )
    forget_rels = {f.relation for f in forget}
    chosen = {f.id for f in forget}
    neighbour, rest = [], []
    for r, facts in by_rel.items():
        others = [f for f in facts if f.id not in chosen]
        if r in forget_rels:
            neighbour += others[0::2]
            rest += others[1::2]
        else:
            rest += others
    rng.shuffle(rest)
    rng.shuffle(neighbour)
    # evaluation cost grows with the sets; the same cap keeps the neighbour set comparable
    neighbour = neighbour[: cfg.retain_size]
    retain = rest[: cfg.retain_size]
    nonmember = list(nonmember_pool)[: cfg.nonmember_size]
    return Split(forget, retain, neighbour, nonmember, split_requests(forget, cfg.requests))


def split_finetuned(
    learned: Sequence[Fact], known_real: Sequence[Fact], unseen: Sequence[Fact], cfg: PulseConfig
) -> Split:
    """The fine-tuned phase's split: forget ``learned`` facts (about invented people, in their
    order) with an answer of their own, retain the other learned facts, neighbours drawn from
    the real facts the model knew before fine-tuning, never-seen from ``unseen``."""
    if len(learned) < cfg.requests + 1:
        raise ValueError(
            f"fine-tuning taught only {len(learned)} facts; increase finetune_epochs or finetune_lr"
        )
    answers = collections.Counter(answer_key(f) for f in learned)
    own = [f for f in learned if answers[answer_key(f)] == 1]
    forget = own[: min(cfg.forget_size, len(learned) - 1)]
    if len(forget) < cfg.requests:
        raise ValueError(
            f"only {len(forget)} fine-tuned facts have an answer no other learned "
            f"fact shares; need at least requests={cfg.requests} (fine-tune more "
            "entities: finetune_entities)"
        )
    forget_ids = {f.id for f in forget}
    retain = [f for f in learned if f.id not in forget_ids][: cfg.retain_size]
    rng = random.Random(cfg.seed)
    neighbour = sample(known_real, max(cfg.retain_size // 2, 1), rng)
    return Split(
        forget,
        retain,
        neighbour,
        list(unseen)[: cfg.nonmember_size],
        split_requests(forget, cfg.requests),
    )


def split_focused(pool: Sequence[Fact], nonmember_pool: Sequence[Fact], cfg: PulseConfig) -> Split:
    """A concentrated split of the facts a model knows (``pool``), as real deletion requests
    are: ``cfg.focus == "relation"`` or ``"subject"``.

    - ``"relation"``: each request forgets facts of ONE relation (its share of ``forget_size``;
      requests take different relations while there are enough). Only facts whose answer no
      other fact of ``pool`` shares are forgotten. Neighbours: half of the other facts of the
      forgotten relations, held out; the other half joins the facts the retain set is drawn
      from, so it may hold facts of the same relations (never a neighbour).
    - ``"subject"``: each request forgets ALL facts of one subject (``Fact.entity`` or
      ``subject``; ``forget_size`` is not used: ``requests`` subjects are forgotten).
      Neighbours: the facts of the same relations about other subjects, every other subject
      held out in full; the others are retained. A fact that shares an answer with a
      forgotten fact is left out of both (keeping it would ask the model to keep and drop the
      same answer).

    The retain set is capped at ``retain_size`` and so is the neighbour set; never-seen
    samples come from ``nonmember_pool``.
    """
    rng = random.Random(cfg.seed)
    if cfg.focus == "relation":
        requests, neighbour, rest = _focus_relation(pool, cfg, rng)
    elif cfg.focus == "subject":
        requests, neighbour, rest = _focus_subject(pool, cfg, rng)
    else:
        raise ValueError(f"split_focused needs focus 'relation' or 'subject', got {cfg.focus!r}")
    forget = [f for r in requests for f in r]
    return Split(
        forget,
        rest[: cfg.retain_size],
        neighbour[: cfg.retain_size],
        list(nonmember_pool)[: cfg.nonmember_size],
        requests,
    )


def _focus_relation(pool: Sequence[Fact], cfg: PulseConfig, rng: random.Random):
    answers = collections.Counter(answer_key(f) for f in pool)
    by_rel: dict[str, list[Fact]] = {}
    for f in pool:
        by_rel.setdefault(f.relation, []).append(f)
    own: dict[str, list[Fact]] = {}
    for r, facts in by_rel.items():
        rng.shuffle(facts)
        own[r] = [f for f in facts if answers[answer_key(f)] == 1]
    sizes = [len(c) for c in split_requests(range(cfg.forget_size), cfg.requests)]
    rels = sorted(by_rel)
    rng.shuffle(rels)
    taken = dict.fromkeys(rels, 0)
    requests: list[list[Fact]] = []
    for size in sizes:
        # the least-used relation that can give `size` more facts and still leave 2 of its
        # facts (a neighbour and a retain fact); ties in the seeded order
        fits = [
            r
            for r in rels
            if taken[r] + size <= len(own[r]) and len(by_rel[r]) - taken[r] - size >= 2
        ]
        if not fits:
            raise ValueError(
                f"no relation has {size} more known facts with an answer of their own (and 2 "
                f"left to hold out and retain) for request {len(requests) + 1}; lower "
                "forget_size or requests"
            )
        r = min(fits, key=lambda x: (taken[x] > 0, rels.index(x)))
        requests.append(own[r][taken[r] : taken[r] + size])
        taken[r] += size
    chosen = {f.id for req in requests for f in req}
    neighbour, rest = [], []
    for r in rels:
        others = [f for f in by_rel[r] if f.id not in chosen]
        if taken[r]:
            neighbour += others[0::2]
            rest += others[1::2]
        else:
            rest += others
    rng.shuffle(neighbour)
    rng.shuffle(rest)
    return requests, neighbour, rest


def _focus_subject(pool: Sequence[Fact], cfg: PulseConfig, rng: random.Random):
    by_subject: dict[str, list[Fact]] = {}
    for f in pool:
        by_subject.setdefault(entity_of(f), []).append(f)
    subjects = sorted(by_subject)
    rng.shuffle(subjects)
    # subjects with the most known facts first (in the seeded order among equals)
    ranked = sorted(
        (s for s in subjects if len(by_subject[s]) >= 2), key=lambda s: -len(by_subject[s])
    )
    if len(ranked) < cfg.requests + 1:
        raise ValueError(
            f"only {len(ranked)} subjects have 2 or more known facts; need "
            f"requests + 1 = {cfg.requests + 1} (one to forget per request and "
            "others to keep)"
        )
    forgotten = ranked[: cfg.requests]
    requests = [list(by_subject[s]) for s in forgotten]
    dropped = {answer_key(f) for req in requests for f in req}
    relations = {f.relation for req in requests for f in req}
    neighbour: list[Fact] = []
    rest: list[Fact] = []
    hold_out = True  # subjects alternate between held out and retained
    for s in subjects:
        if s in forgotten:
            continue
        facts = [f for f in by_subject[s] if answer_key(f) not in dropped]
        related = [f for f in facts if f.relation in relations]
        if hold_out and related:
            neighbour += related
            rest += [f for f in facts if f.relation not in relations]
        else:
            rest += facts
        if related:
            hold_out = not hold_out
    rng.shuffle(neighbour)
    rng.shuffle(rest)
    return requests, neighbour, rest


__all__ = [
    "Split",
    "answer_key",
    "entity_of",
    "entity_shuffled",
    "known_facts",
    "split_finetuned",
    "split_focused",
    "split_pretrained",
    "split_requests",
]
