"""Data shipped with unlearnopt and loaders for a user's own JSONL files.

Shipped files (plain text, written for this package; no download):

- ``facts.jsonl``: real-world facts (capitals, chemical symbols, authors, SI units, currencies,
  planets, languages, continents, painters, discoveries). One record per line::

      {"id": "capital/France", "relation": "capital", "subject": "France",
       "prompt": "The capital of France is", "answer": "Paris",
       "paraphrases": ["France's capital city is", "The capital city of France is called"]}

  The model is scored on ``prompt + " " + answer``; facts sharing a ``relation`` are each
  other's *neighbours* (related knowledge that an unlearning run must not destroy).
  ``subject`` is what the prompt asks about, written as it occurs in the prompt (keyed edits
  and causal tracing read the model at its last token); where the fact is about someone else
  (``discovery``: "The telephone was invented by" is about Alexander Graham Bell),
  ``entity`` names them.
- ``fictitious.jsonl``: 50 invented people with four facts each (birthplace, profession,
  favourite food, instrument), same fields plus ``entity``; knowledge no pretrained model has,
  for the fine-tuned-knowledge part of PULSE.
- ``neutral.txt``: everyday sentences, one per line, for perplexity (fluency).
- ``idk.txt``: "I don't know"-style completions, one per line (written to follow a fact's
  prompt, e.g. "The capital of France is" + " unknown to me."), the preferred answers of
  ``idk_dpo``; read with :func:`idk_answers`.

A user's own forget/retain file needs only ``prompt`` and ``answer`` on each line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


class DataFormatError(ValueError):
    """A data file is missing or malformed; the message names the file and the line."""


@dataclass(frozen=True)
class Fact:
    """One prompt -> answer fact; ``paraphrases`` are other prompts with the same answer."""

    prompt: str
    answer: str
    paraphrases: tuple[str, ...] = ()
    relation: str = "user"
    id: str = ""
    subject: str = ""
    entity: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        d = {
            "id": self.id,
            "relation": self.relation,
            "subject": self.subject,
            "prompt": self.prompt,
            "answer": self.answer,
            "paraphrases": list(self.paraphrases),
        }
        if self.entity:
            d["entity"] = self.entity
        return d


_KNOWN_KEYS = {"id", "relation", "subject", "entity", "prompt", "answer", "paraphrases"}


def _fact_from_record(rec: object, where: str) -> Fact:
    if not isinstance(rec, dict):
        raise DataFormatError(
            f"{where}: expected a JSON object with 'prompt' and 'answer', got {type(rec).__name__}"
        )
    for key in ("prompt", "answer"):
        if key not in rec:
            raise DataFormatError(
                f"{where}: missing required field '{key}' (each line needs 'prompt' and 'answer')"
            )
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise DataFormatError(
                f"{where}: field '{key}' must be a non-empty string, got {rec[key]!r}"
            )
    paras = rec.get("paraphrases", [])
    if not isinstance(paras, list) or not all(isinstance(p, str) and p.strip() for p in paras):
        raise DataFormatError(f"{where}: 'paraphrases' must be a list of non-empty strings")
    return Fact(
        prompt=rec["prompt"].strip(),
        answer=rec["answer"].strip(),
        paraphrases=tuple(p.strip() for p in paras),
        relation=str(rec.get("relation", "user")),
        id=str(rec.get("id", "")),
        subject=str(rec.get("subject", "")),
        entity=str(rec.get("entity", "")),
        extra={k: v for k, v in rec.items() if k not in _KNOWN_KEYS},
    )


def load_facts_file(path: str | Path) -> list[Fact]:
    """Read a JSONL file of facts (one JSON object per line; blank lines skipped).

    Raises ``DataFormatError`` naming the file and line number for a missing file, invalid
    JSON, a missing ``prompt``/``answer``, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file not found: {path}")
    facts: list[Fact] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
            fact = _fact_from_record(rec, where)
            if not fact.id:
                fact = Fact(**{**fact.__dict__, "id": f"{path.stem}/{lineno}"})
            facts.append(fact)
    if not facts:
        raise DataFormatError(
            f"{path}: no records (expected JSON lines with 'prompt' and 'answer')"
        )
    return facts


def load_real_facts() -> list[Fact]:
    """The shipped real-world facts (``facts.jsonl``), each with a ``relation``."""
    return load_facts_file(DATA_DIR / "facts.jsonl")


def load_fictitious_facts() -> list[Fact]:
    """The shipped facts about invented people (``fictitious.jsonl``), each with an ``entity``."""
    return load_facts_file(DATA_DIR / "fictitious.jsonl")


def load_neutral_texts() -> list[str]:
    """The shipped neutral sentences (``neutral.txt``) used to measure perplexity."""
    lines = (DATA_DIR / "neutral.txt").read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip()]


__all__ = [
    "DATA_DIR",
    "DataFormatError",
    "Fact",
    "load_facts_file",
    "load_fictitious_facts",
    "load_neutral_texts",
    "load_real_facts",
]


def idk_answers() -> list[str]:
    """The shipped "I don't know"-style completions (``idk.txt``), in file order."""
    path = DATA_DIR / "idk.txt"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    answers = [ln for ln in lines if ln]
    if not answers:
        raise DataFormatError(f"{path}: no answers")
    return answers
