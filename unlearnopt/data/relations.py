"""Retain facts of the forget facts' own relations, for specific unlearning.

Forgetting several facts of one relation (six capitals) with retain facts of other relations
only teaches a model to stop answering the relation: every other capital is lost with them.
Retain batches that also hold other facts of the same relation tell the method which part
of the forget gradient is the relation (to keep) and which is the facts (to drop).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from unlearnopt.data import Fact


def _key(f: Fact) -> str:
    return f.id or f"{f.prompt}\x00{f.answer}"


def _answer(f: Fact) -> str:
    return " ".join(f.answer.lower().split())


def same_relation_facts(
    pool: Iterable[Fact],
    forget: Sequence[Fact],
    exclude: Iterable[Fact] = (),
    k: int | None = None,
    seed: int = 0,
) -> list[Fact]:
    """Facts of ``pool`` that share a ``relation`` with some forget fact, to add to the
    retain set.

    Left out: the forget facts themselves, every fact of ``exclude`` (pass the facts you
    evaluate on, e.g. held-out neighbours, so that they stay never trained on), and facts
    whose answer is one of the forget answers (keeping "Spanish" for Mexico while forgetting
    it for Argentina asks to keep and drop the same answer to the same question). Facts are
    matched by ``id`` (or by prompt and answer when they have none); answers compare
    case- and space-insensitively.

    Args:
        pool: candidate facts (e.g. the facts the model knows).
        forget: the facts to forget; their relations are the ones kept.
        exclude: facts never to return.
        k: at most this many, a seeded random sample (None: all, in pool order).
        seed: seed of the sample.

    Returns:
        A list of facts (a new list; the pool is not modified).
    """
    forget = list(forget)
    if not forget:
        raise ValueError("forget must hold at least one fact")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"k must be a non-negative int or None, got {k!r}")
    for name, facts in (("pool", pool), ("forget", forget), ("exclude", exclude)):
        if isinstance(facts, Fact):
            raise TypeError(f"{name} must be a sequence of Fact, got a single Fact")
    relations = {f.relation for f in forget}
    banned = {_key(f) for f in forget} | {_key(f) for f in exclude}
    answers = {_answer(f) for f in forget}
    out = []
    for f in pool:
        if not isinstance(f, Fact):
            raise TypeError(f"pool must hold Fact objects, got {type(f).__name__}")
        if f.relation in relations and _key(f) not in banned and _answer(f) not in answers:
            out.append(f)
    if k is not None and k < len(out):
        out = random.Random(seed).sample(out, k)
    return out


__all__ = ["same_relation_facts"]
