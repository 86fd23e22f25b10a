"""The TOFU/MUSE metrics of PULSE's fine-tuned phase (forget quality, model utility, privleak,
extraction strength, exact memorisation) reach the report: the text tables, the PNG table
and the PNG bar chart, with each run's values; a phase without a retain model has none."""

from __future__ import annotations

import pytest

from unlearnopt.eval.report import (
    TOFU_COLUMNS,
    format_tofu_table,
    tofu_runs,
    tofu_table_rows,
    write_report,
)
from unlearnopt.eval.tofu_metrics import TOFU_METRIC_NAMES

TOFU = {
    "before": {
        "forget_quality": 0.001,
        "model_utility": 0.5,
        "privleak": 0.75,
        "extraction_strength": 0.9,
        "exact_memorization": 0.95,
    },
    "ga": {
        "forget_quality": 0.4,
        "model_utility": 0.25,
        "privleak": -0.125,
        "extraction_strength": 0.2,
        "exact_memorization": 0.3,
    },
    "undial": {
        "forget_quality": 0.2,
        "model_utility": 0.45,
        "privleak": 0.0625,
        "extraction_strength": 0.35,
        "exact_memorization": 0.4,
    },
}


def _records(method: str, tofu: bool) -> list[dict]:
    metrics = {"forget_acc": 0.0, "retain_acc": 0.8, "ppl": 12.0}
    recs = [
        {"request": 1, "point": "end", "step": 3, "metrics": metrics},
        {"request": 2, "point": "end", "step": 6, "metrics": metrics},
    ]
    if tofu:
        recs[-1]["tofu"] = dict(TOFU[method])
    return recs


def _phase(tofu: bool) -> dict:
    before = {"forget_acc": 1.0, "retain_acc": 0.9, "ppl": 11.0}
    data = {
        "before": before,
        "methods": {m: _records(m, tofu) for m in ("ga", "undial")},
        "summary": [
            {"name": "before", "steps": 0, **before},
            {"name": "ga@end", "steps": 6, "forget_acc": 0.0},
            {"name": "undial@end", "steps": 6, "forget_acc": 0.0},
        ],
    }
    if tofu:
        data["tofu_before"] = dict(TOFU["before"])
    return data


def test_columns_cover_every_tofu_metric():
    assert {key for key, _, _ in TOFU_COLUMNS} == set(TOFU_METRIC_NAMES)


def test_tofu_rows_hold_each_runs_values():
    runs = tofu_runs(_phase(tofu=True))
    assert [name for name, _ in runs] == ["before", "ga@end", "undial@end"]
    header, rows = tofu_table_rows(_phase(tofu=True))
    assert header[0] == "run" and len(header) == 1 + len(TOFU_COLUMNS)
    ga = dict(zip(header, rows[1]))
    assert ga["run"] == "ga@end"
    assert ga["forget quality ↑"] == "0.4"
    assert ga["utility ↑"] == "0.250"
    assert ga["privleak →0"] == "-0.125"
    assert ga["extraction ↓"] == "0.200"
    assert ga["exact mem ↓"] == "0.300"
    assert tofu_runs(_phase(tofu=False)) == [] and format_tofu_table(_phase(tofu=False)) is None


def test_write_report_puts_tofu_metrics_in_tables_and_plots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    bars = []
    original_bar = Axes.bar

    def recording_bar(self, x, height, *args, **kwargs):
        bars.append(list(height))
        return original_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", recording_bar)

    report = {"phases": {"pretrained": _phase(tofu=False), "finetuned": _phase(tofu=True)}}
    paths = write_report(report, tmp_path)

    # text: the phase's table file carries the TOFU table too, and so does its own file
    for name in ("finetuned_table.txt", "finetuned_tofu_table.txt"):
        text = (tmp_path / name).read_text()
        for _, label, _ in TOFU_COLUMNS:
            assert label in text, (name, label)
        assert "undial@end" in text and "-0.125" in text and "+0.062" in text
    assert "forget quality" not in (tmp_path / "pretrained_table.txt").read_text()

    # PNGs: a bar chart and a table for the phase with a retain model, none for the other
    for key in ("finetuned_tofu", "finetuned_tofu_table"):
        png = paths[key].read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not (tmp_path / "pretrained_tofu.png").exists()
    assert not (tmp_path / "pretrained_tofu_table.png").exists()

    # one bar group per metric, heights = before, ga@end, undial@end
    assert len(bars) == len(TOFU_COLUMNS)
    for (key, _, _), heights in zip(TOFU_COLUMNS, bars):
        assert heights == [TOFU[run][key] for run in ("before", "ga", "undial")], key
