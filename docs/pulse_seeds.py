"""Summarise PULSE reports of several seeds: mean and worst seed per method, and how many seeds
met the quality bar.

    python docs/pulse_seeds.py RUN_DIR[=LABEL] [RUN_DIR ...] --out PREFIX [--title TEXT]

Each RUN_DIR holds a ``report.json`` of ``unlearnopt pulse`` (one seed). Rows: ``method xR``
(the end of R sequential requests) for each method and phase, and ``method x1`` (the same
facts as one request) where the run compared them (``--compare-one-shot``). A run with
``--option``s or another ``--lr`` gets its own rows, named by them, or by LABEL. Writes PREFIX.md
(the table), PREFIX.json (the numbers) and PREFIX.png (retain and neighbour accuracy after
unlearning as a share of before, per run and seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_LR = 1e-5  # unlearnopt pulse --lr's default

# (column, metric, worst is the larger value)
COLUMNS = [
    ("forget acc", "forget_acc", True),
    ("retain acc", "retain_acc", False),
    ("neighbour acc", "neighbour_acc", False),
]


def rows_of(phase: dict) -> tuple[list[dict], dict]:
    """The runs of one phase (one-shot comparison when present) and their verdicts."""
    if "one_shot" in phase:
        return phase["one_shot"]["summary"], phase["one_shot"]["verdicts"]
    return phase["summary"], phase["verdicts"]


def variant(config: dict, method: str) -> str:
    """The label " (k=v, ...)" for a run whose settings of ``method`` differ from the defaults (its
    ``--option``s, and ``--lr`` for a gradient method), else ""."""
    options = dict(config.get("method_options", {}).get(method, {}))
    if method != "keyed" and config.get("lr", DEFAULT_LR) != DEFAULT_LR:
        options.setdefault("lr", config["lr"])
    if not options:
        return ""
    text = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()
    )
    return f" ({text})"


def collect(run_dirs: list[str]) -> dict:
    """{phase: {run name: [per-seed dict]}} from the reports; ``DIR=LABEL`` names the
    settings of that run's methods (instead of reading them from its options)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for item in run_dirs:
        d, _, label = item.partition("=")
        d = Path(d)
        report = json.loads((d / "report.json").read_text())
        seed = report["config"]["seed"]
        for phase_name, phase in report["phases"].items():
            summary, verdicts = rows_of(phase)
            before = phase["before"]
            requests = report["config"]["requests"]
            for row in summary:
                if row["name"] == "before":
                    continue
                verdict = verdicts[row["name"]]
                # "method@end" of a run without the comparison is its "method xR" row
                name = row["name"].replace("@end", f" x{requests}")
                method, rest = name.split(" ", 1)
                settings = f" ({label})" if label else variant(report["config"], method)
                name = f"{method}{settings} {rest}"
                out.setdefault(phase_name, {}).setdefault(name, []).append(
                    {
                        "seed": seed,
                        "steps": row["steps"],
                        **{m: row[m] for _, m, _ in COLUMNS},
                        "before": {m: before[m] for _, m, _ in COLUMNS},
                        "ppl_change": 100.0 * (row["ppl"] / before["ppl"] - 1.0),
                        "meets": all(verdict.values()),
                        "verdict": verdict,
                    }
                )
    order = {"pretrained": 0, "finetuned": 1}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], 2)))


def fmt(values: list[float], worst_is_max: bool, spec: str = ".2f") -> str:
    mean = sum(values) / len(values)
    worst = max(values) if worst_is_max else min(values)
    return f"{mean:{spec}} ({worst:{spec}})"


def table(data: dict) -> str:
    head = ["phase", "run", "seeds", "steps", *[c for c, _, _ in COLUMNS], "ppl change %"]
    head.append("meets the bar")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase, runs in data.items():
        for name, seeds in runs.items():
            cells = [phase, name, str(len(seeds))]
            cells.append(f"{sum(s['steps'] for s in seeds) / len(seeds):.1f}")
            for _, m, worst_max in COLUMNS:
                cells.append(fmt([s[m] for s in seeds], worst_max))
            cells.append(fmt([s["ppl_change"] for s in seeds], True, "+.1f"))
            cells.append(f"{sum(s['meets'] for s in seeds)}/{len(seeds)}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, retain, neighbour = [], [], []
    for phase, runs in data.items():
        for name, seeds in runs.items():
            # "method (settings) xR": the settings on lines of their own, so labels do not overlap
            head, _, settings = name.partition(" (")
            settings, _, requests = settings.rpartition(") ")
            label = f"{phase}\n{head} {requests}" if settings else f"{phase}\n{name}"
            labels.append(label + ("\n" + settings.replace(", ", ",\n") if settings else ""))
            retain.append([s["retain_acc"] / s["before"]["retain_acc"] for s in seeds])
            neighbour.append([s["neighbour_acc"] / s["before"]["neighbour_acc"] for s in seeds])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 5))
    for i, (r, n) in enumerate(zip(retain, neighbour)):
        ax.scatter([i - 0.12] * len(r), r, color="tab:blue", label="retain" if i == 0 else None)
        ax.scatter(
            [i + 0.12] * len(n), n, color="tab:orange", label="neighbours" if i == 0 else None
        )
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="bar (90%)")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("accuracy after / before (each seed)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="PULSE over seeds")
    args = parser.parse_args()
    data = collect(args.runs)
    text = table(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, args.out.with_suffix(".png"), args.title)
    print(text)


if __name__ == "__main__":
    main()
