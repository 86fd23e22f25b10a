"""Writing a PULSE report: ``report.json``, one PNG of metrics vs request per phase, and a
before/after table (PNG and plain text); with a retain model (fine-tuned phase), the TOFU/MUSE
metrics (forget quality, model utility, privleak, extraction strength, exact memorisation)
as a table (PNG and plain text, also appended to the phase's text table) and a bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from unlearnopt.eval.metrics import HOW_TO_READ, METRIC_LABELS

TABLE_COLUMNS = (
    ("steps", "steps", "{:.0f}"),
    *(
        (key, METRIC_LABELS[key], spec)
        for key, spec in (
            ("forget_acc", "{:.2f}"),
            ("general_acc", "{:.2f}"),
            ("retain_acc", "{:.2f}"),
            ("neighbour_acc", "{:.2f}"),
            ("ppl", "{:.1f}"),
            ("diversity", "{:.2f}"),
            ("mia_auc", "{:.2f}"),
        )
    ),
)
PLOT_METRICS = (
    "forget_acc",
    "general_acc",
    "retain_acc",
    "neighbour_acc",
    "forget_prob",
    "ppl",
    "diversity",
    "mia_auc",
)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def table_rows(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the comparison table."""
    header = ["run"] + [label for _, label, _ in TABLE_COLUMNS]
    rows = [
        [row["name"]] + [_fmt(row.get(key), spec) for key, _, spec in TABLE_COLUMNS]
        for row in summary
    ]
    return header, rows


def format_table(summary: list[dict[str, Any]], legend: bool = False) -> str:
    """The comparison table as aligned plain text (accuracies are exact-match fractions);
    ``legend``: add a line saying how to read it."""
    header, rows = table_rows(summary)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    if legend:
        lines.append(HOW_TO_READ)
    return "\n".join(lines)


TOFU_COLUMNS = (
    ("forget_quality", "forget quality ↑", "{:.3g}"),
    ("model_utility", "utility ↑", "{:.3f}"),
    ("privleak", "privleak →0", "{:+.3f}"),
    ("extraction_strength", "extraction ↓", "{:.3f}"),
    ("exact_memorization", "exact mem ↓", "{:.3f}"),
)


TOFU_NOTE = (
    "Against a retain model fine-tuned without the forget facts: forget quality "
    "is a KS-test p-value (higher = closer to it), privleak its relative MIA-AUC "
    "gap."
)


def tofu_runs(data: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """``[(run name, TOFU metrics)]`` of one phase: "before", then each method at the end of
    its run (the methods whose last record has them); [] when the phase has none."""
    if "tofu_before" not in data:
        return []
    runs = [("before", data["tofu_before"])]
    runs += [
        (f"{m}@end", recs[-1]["tofu"])
        for m, recs in data["methods"].items()
        if recs and "tofu" in recs[-1]
    ]
    return runs


def tofu_table_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the TOFU/MUSE table (no rows without a retain model)."""
    header = ["run"] + [label for _, label, _ in TOFU_COLUMNS]
    rows = [
        [name] + [_fmt(vals.get(k), spec) for k, _, spec in TOFU_COLUMNS]
        for name, vals in tofu_runs(data)
    ]
    return header, rows


def format_tofu_table(data: dict[str, Any]) -> str | None:
    """The TOFU/MUSE metrics of one phase (before, then each method at the end of its run)
    as aligned plain text; None when the phase has none (no retain model)."""
    header, rows = tofu_table_rows(data)
    if not rows:
        return None
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(TOFU_NOTE)
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``<phase>_metrics.png``, ``<phase>_table.png``,
    ``<phase>_table.txt`` and, with a retain model, ``<phase>_tofu_table.txt`` into
    ``out_dir`` (created); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"report": out / "report.json"}
    paths["report"].write_text(json.dumps(report, indent=1))
    for phase, data in report.get("phases", {}).items():
        txt = out / f"{phase}_table.txt"
        tofu = format_tofu_table(data)
        # The phase's table file carries every table of the phase (TOFU/MUSE metrics too).
        extra = "" if tofu is None else f"\nTOFU/MUSE metrics:\n{tofu}\n"
        txt.write_text(format_table(data["summary"], legend=True) + "\n" + extra)
        paths[f"{phase}_table_txt"] = txt
        if tofu is not None:
            paths[f"{phase}_tofu_table_txt"] = out / f"{phase}_tofu_table.txt"
            paths[f"{phase}_tofu_table_txt"].write_text(tofu + "\n")
        if "one_shot" in data:
            one = out / f"{phase}_one_shot_table.txt"
            one.write_text(format_table(data["one_shot"]["summary"], legend=True) + "\n")
            paths[f"{phase}_one_shot_table_txt"] = one
        try:
            paths[f"{phase}_metrics"] = plot_metrics(phase, data, out / f"{phase}_metrics.png")
            paths[f"{phase}_table"] = plot_table(phase, data["summary"], out / f"{phase}_table.png")
            if tofu is not None:
                paths[f"{phase}_tofu"] = plot_tofu(phase, data, out / f"{phase}_tofu.png")
                paths[f"{phase}_tofu_table"] = plot_tofu_table(
                    phase, data, out / f"{phase}_tofu_table.png"
                )
        except ImportError:  # matplotlib is optional: the JSON and text table still exist
            pass
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(phase: str, data: dict[str, Any], path: Path) -> Path:
    """Metric vs request (0 = before), one line per method, end-of-request values."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = 4
    rows = math.ceil(len(PLOT_METRICS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    before = data["before"]
    for ax, metric in zip(axes.flat, PLOT_METRICS):
        for method, recs in data["methods"].items():
            ends = [r for r in recs if r["point"] == "end"]
            xs = [0] + [r["request"] for r in ends]
            ys = [before.get(metric)] + [r["metrics"].get(metric) for r in ends]
            ys = [float("nan") if y is None else y for y in ys]
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(METRIC_LABELS[metric])
        ax.set_xlabel("request")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # requests are whole numbers
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(PLOT_METRICS) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle(
        f"PULSE ({phase} knowledge): metrics after each unlearning request\n{HOW_TO_READ}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_table(phase: str, summary: list[dict[str, Any]], path: Path) -> Path:
    """The before/after comparison table as an image."""
    header, rows = table_rows(summary)
    title = f"PULSE ({phase} knowledge): before and after unlearning"
    return _draw_table(header, rows, title, HOW_TO_READ, path)


def plot_tofu_table(phase: str, data: dict[str, Any], path: Path) -> Path:
    """The TOFU/MUSE table of a phase with a retain model (:func:`format_tofu_table`) as an
    image."""
    header, rows = tofu_table_rows(data)
    if not rows:
        raise ValueError(f"phase {phase!r} has no TOFU metrics (no retain model)")
    title = f"PULSE ({phase} knowledge): TOFU/MUSE metrics against the retain model"
    return _draw_table(header, rows, title, TOFU_NOTE, path)


def plot_tofu(phase: str, data: dict[str, Any], path: Path) -> Path:
    """One bar chart per TOFU/MUSE metric: before, then each method at the end of its run."""
    runs = tofu_runs(data)
    if not runs:
        raise ValueError(f"phase {phase!r} has no TOFU metrics (no retain model)")
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(TOFU_COLUMNS), figsize=(3.2 * len(TOFU_COLUMNS), 3.6), squeeze=False
    )
    names = [name for name, _ in runs]
    for ax, (key, label, _) in zip(axes.flat, TOFU_COLUMNS):
        values = [vals.get(key) for _, vals in runs]
        values = [float("nan") if v is None else float(v) for v in values]
        ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if key == "privleak":
            ax.axhline(0.0, color="black", linewidth=0.8)
        finite = [v for v in values if math.isfinite(v)]
        if key == "forget_quality" and finite and min(finite) > 0:
            ax.set_yscale("log")  # a p-value: small ones differ by orders of magnitude
            ax.set_title(f"{label} (log scale)")
    fig.suptitle(
        f"PULSE ({phase} knowledge): TOFU/MUSE metrics at the end of each method\n{TOFU_NOTE}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw_table(header: list[str], rows: list[list[str]], title: str, note: str, path: Path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(header) + 1.5, 0.45 * (len(rows) + 3)))
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    ax.set_title(title)
    fig.text(0.5, 0.01, note, ha="center", fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "format_table",
    "format_tofu_table",
    "plot_metrics",
    "plot_table",
    "plot_tofu",
    "plot_tofu_table",
    "table_rows",
    "tofu_runs",
    "tofu_table_rows",
    "write_report",
]
