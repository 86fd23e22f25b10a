"""The PULSE report's tables (``summarize``, ``one_shot_rows``), the quality bar and its
verdicts, and the report's JSON form."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def summarize(before: dict[str, float], records: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Rows of the comparison table: "before", then per method "@target" (the last request's
    first step at the forget target; absent if never reached or if the request stopped there)
    and "@end"."""
    rows = [{"name": "before", "method": None, "point": "before", "steps": 0, **before}]
    for method, recs in records.items():
        last_r = max(rec["request"] for rec in recs)
        at = [rec for rec in recs if rec["request"] == last_r and rec["point"] == "at_target"]
        end = next(rec for rec in recs if rec["request"] == last_r and rec["point"] == "end")
        if at and at[0]["step"] != end["step"]:  # stopped at the target: one point
            rows.append(
                {
                    "name": f"{method}@target",
                    "method": method,
                    "point": "at_target",
                    "steps": at[0]["step"],
                    **at[0]["metrics"],
                }
            )
        rows.append(
            {
                "name": f"{method}@end",
                "method": method,
                "point": "end",
                "steps": end["step"],
                **end["metrics"],
            }
        )
    return rows


# The quality bar: forget accuracy at most MAX_FORGET_ACC, retain and neighbour accuracy at
# least KEEP_FRACTION of before, perplexity at most MAX_PPL_RATIO times before.
MAX_FORGET_ACC = 0.1
KEEP_FRACTION = 0.9
MAX_PPL_RATIO = 1.1
QUALITY_BAR_TEXT = (
    f"forget accuracy <= {MAX_FORGET_ACC:.2f}, retain and neighbour accuracy "
    f">= {KEEP_FRACTION:.0%} of before, perplexity <= before "
    f"+{MAX_PPL_RATIO - 1:.0%}"
)


def _bar_checks(before: dict[str, float], row: dict[str, float]):
    """``(key, passed, words)`` per criterion of the quality bar."""
    keep_r = KEEP_FRACTION * before["retain_acc"]
    keep_n = KEEP_FRACTION * before["neighbour_acc"]
    max_ppl = MAX_PPL_RATIO * before["ppl"]
    return [
        (
            "forgot",
            row["forget_acc"] <= MAX_FORGET_ACC + 1e-9,
            f"forget accuracy {row['forget_acc']:.2f} (needs <= {MAX_FORGET_ACC:.2f})",
        ),
        (
            "kept_retain",
            row["retain_acc"] >= keep_r - 1e-9,
            (
                f"retain accuracy {row['retain_acc']:.2f} (needs >= {keep_r:.2f}, "
                f"{KEEP_FRACTION:.0%} of {before['retain_acc']:.2f} before)"
            ),
        ),
        (
            "kept_neighbours",
            row["neighbour_acc"] >= keep_n - 1e-9,
            (
                f"neighbour accuracy {row['neighbour_acc']:.2f} (needs >= {keep_n:.2f}, "
                f"{KEEP_FRACTION:.0%} of {before['neighbour_acc']:.2f} before)"
            ),
        ),
        (
            "fluent",
            row["ppl"] <= max_ppl,
            (
                f"perplexity {row['ppl']:.1f} (needs <= {max_ppl:.1f}, before "
                f"{before['ppl']:.1f} +{MAX_PPL_RATIO - 1:.0%})"
            ),
        ),
    ]


def quality_verdict(before: dict[str, float], row: dict[str, float]) -> dict[str, bool]:
    """The quality bar (``QUALITY_BAR_TEXT``), one bool per criterion: ``forgot``,
    ``kept_retain``, ``kept_neighbours``, ``fluent``."""
    return {key: bool(ok) for key, ok, _ in _bar_checks(before, row)}


def describe_verdict(before: dict[str, float], row: dict[str, float]) -> str:
    """The verdict in words: "meets the quality bar", or what misses it and by how much."""
    missed = [words for _, ok, words in _bar_checks(before, row) if not ok]
    return "meets the quality bar" if not missed else "misses: " + "; ".join(missed)


def one_shot_rows(
    before: dict[str, float],
    sequential: dict[str, list[dict]],
    one_shot: dict[str, list[dict]],
    requests: int,
) -> list[dict[str, Any]]:
    """Rows of the one-shot vs split table: "before", then per method the end of the
    sequential run (``"<method> x<requests>"``) and of the one-request run (``"<method> x1"``),
    both measured on all the forget facts."""
    rows = [{"name": "before", "method": None, "point": "before", "steps": 0, **before}]
    for method, seq in sequential.items():
        for label, recs in ((f"x{requests}", seq), ("x1", one_shot[method])):
            end = [r for r in recs if r["point"] == "end"][-1]
            rows.append(
                {
                    "name": f"{method} {label}",
                    "method": method,
                    "point": "end",
                    "requests": max(r["request"] for r in recs),
                    "steps": end["step"],
                    "reached_target": all(
                        r["steps_to_target"] is not None for r in recs if r["point"] == "end"
                    ),
                    **end["metrics"],
                }
            )
    return rows


def jsonable(obj):
    """``obj`` as JSON-ready values: numpy scalars as Python ones, non-finite floats as
    ``None``, anything else unknown as its ``repr``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def dump_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1))


__all__ = [
    "KEEP_FRACTION",
    "MAX_FORGET_ACC",
    "MAX_PPL_RATIO",
    "QUALITY_BAR_TEXT",
    "describe_verdict",
    "dump_json",
    "jsonable",
    "one_shot_rows",
    "quality_verdict",
    "summarize",
]
