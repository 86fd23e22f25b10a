"""The shipped fact files: every fact names a subject that occurs in its prompt (keyed edits
and causal tracing read the model at the subject's last token), and ids are unique."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("loader", ["load_real_facts", "load_fictitious_facts"])
def test_every_subject_occurs_in_its_prompt(loader):
    import unlearnopt.data as data

    facts = getattr(data, loader)()
    assert facts
    missing = [f.id for f in facts if not f.subject or f.subject not in f.prompt]
    assert not missing, missing
    assert len({f.id for f in facts}) == len(facts)


def test_discovery_facts_are_about_the_person_they_answer():
    from unlearnopt.data import load_real_facts

    discovery = [f for f in load_real_facts() if f.relation == "discovery"]
    assert discovery and all(f.entity == f.answer for f in discovery)
