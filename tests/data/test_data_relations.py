"""same_relation_facts: retain facts of the forget relation, never the excluded ones."""

from __future__ import annotations

import pytest

from unlearnopt.data import Fact
from unlearnopt.data.relations import same_relation_facts


def _fact(rel, subj, ans):
    return Fact(
        prompt=f"The {rel} of {subj} is", answer=ans, relation=rel, id=f"{rel}/{subj}", subject=subj
    )


POOL = [
    _fact("capital", "France", "Paris"),
    _fact("capital", "Japan", "Tokyo"),
    _fact("capital", "Peru", "Lima"),
    _fact("capital", "Chile", "Santiago"),
    _fact("language", "Mexico", "Spanish"),
    _fact("language", "Argentina", "Spanish"),
    _fact("language", "Brazil", "Portuguese"),
    _fact("currency", "Japan", "yen"),
]


def test_same_relation_only_without_forget_and_excluded():
    forget = [POOL[0]]
    out = same_relation_facts(POOL, forget, exclude=[POOL[2]])
    assert [f.id for f in out] == ["capital/Japan", "capital/Chile"]


def test_shared_answers_are_left_out():
    out = same_relation_facts(POOL, [POOL[5]])  # forget Argentina -> Spanish
    assert [f.id for f in out] == ["language/Brazil"]


def test_seeded_sample():
    forget = [POOL[0], POOL[4]]
    a = same_relation_facts(POOL, forget, k=2, seed=3)
    b = same_relation_facts(POOL, forget, k=2, seed=3)
    assert a == b and len(a) == 2
    assert {f.relation for f in a} <= {"capital", "language"}
    assert all(f.id not in {"capital/France", "language/Mexico", "language/Argentina"} for f in a)


@pytest.mark.parametrize(
    "kwargs", [{"forget": []}, {"k": -1}, {"k": 1.5}, {"forget": POOL[0]}, {"pool": ["x"]}]
)
def test_bad_arguments(kwargs):
    args = {"pool": POOL, "forget": [POOL[0]], **kwargs}
    with pytest.raises((ValueError, TypeError)):
        same_relation_facts(**args)
