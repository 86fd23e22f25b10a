"""Render a pytest-benchmark JSON as a markdown table with ratios to eager and to peers.

Usage: ``python -m bench.report [RUN.json] [--save]``. Without a path, the newest file under
``.benchmarks/`` is used. ``--save`` also writes ``bench/results/<device>-<date>.md`` and
copies the JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("eager", "loop", "python loop", "scipy loop")
PEERS = ("liger", "torch.compile", "torchjd", "qpth", "foreach", "cat+matmul")


def newest_run() -> Path:
    runs = sorted((ROOT / ".benchmarks").rglob("*.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no benchmark results under .benchmarks/: run `pytest bench/` first")
    return runs[-1]


def _impl(bench: dict) -> str:
    info = bench.get("extra_info", {})
    if "impl" in info:
        return info["impl"]
    match = re.search(r"\[(.*?)[-\]]", bench["name"])
    return match.group(1) if match else bench["name"]


def _fmt_bytes(n) -> str:
    return "" if n is None else f"{n / 2**20:.0f} MiB"


def _per_problem_table(benches: list[dict]) -> list[str]:
    """Solvers timed per problem (min_norm): ours batched against looped peers, same K."""
    peers = defaultdict(dict)
    ours = []
    for bench in benches:
        info = bench["extra_info"]
        name = bench["name"].split("[")[0].replace("test_bench_", "")
        if "backend" in info:
            ours.append(info)
        else:
            peers[info["K"]][name] = info["per_problem_us"]
    peer_names = sorted({n for d in peers.values() for n in d})
    lines = [
        "## min_norm, time per problem",
        "",
        "| backend | B | K | per problem | max KKT residual | "
        + " | ".join(f"x {n}" for n in peer_names)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(peer_names),
    ]
    for info in sorted(ours, key=lambda i: (i["backend"], i["B"], i["K"])):
        us = info["per_problem_us"]
        ratios = [
            f"{peers[info['K']][n] / us:.0f}" if n in peers[info["K"]] else "" for n in peer_names
        ]
        lines.append(
            f"| {info['backend']} | {info['B']} | {info['K']} | {us:.3f} us | "
            f"{info.get('kkt_max', float('nan')):.1e} | " + " | ".join(ratios) + " |"
        )
    lines.append("")
    lines += [
        "Looped peers, per problem: "
        + "; ".join(
            f"K={k}: " + ", ".join(f"{n} {v:.1f} us" for n, v in sorted(d.items()))
            for k, d in sorted(peers.items())
        ),
        "",
    ]
    return lines


def render(run: dict) -> str:
    info = run.get("machine_info", {}).get("unlearnopt", {})
    lines = [
        f"# unlearnopt benchmarks: {info.get('device', '?')}",
        "",
        f"torch {info.get('torch')}, triton {info.get('triton')}, "
        f"liger-kernel {info.get('liger_kernel')}, {info.get('threads')} threads, "
        f"{info.get('date')}",
        "",
        "Median time of one call; `x baseline` = baseline time / this time (higher is better);",
        "memory = peak extra memory during the call.",
        "",
    ]
    groups = defaultdict(list)
    per_problem = []
    for bench in run["benchmarks"]:
        if "per_problem_us" in bench.get("extra_info", {}):
            per_problem.append(bench)
        else:
            groups[bench.get("group") or bench["name"]].append(bench)
    if per_problem:
        lines += _per_problem_table(per_problem)
    for group, benches in groups.items():
        by_impl = {_impl(b): b for b in benches}
        base_name = next((b for b in BASELINES if b in by_impl), None)
        base = by_impl[base_name]["stats"]["median"] if base_name else None
        base_mem = by_impl[base_name]["extra_info"].get("peak_extra_bytes") if base_name else None
        lines += [
            f"## {group}",
            "",
            f"| impl | median | x {base_name or 'baseline'} | memory | memory / baseline | GB/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, bench in sorted(by_impl.items(), key=lambda kv: kv[1]["stats"]["median"]):
            med = bench["stats"]["median"]
            extra = bench.get("extra_info", {})
            mem = extra.get("peak_extra_bytes")
            speed = f"{base / med:.2f}" if base else ""
            mem_ratio = f"{mem / base_mem:.3f}" if mem is not None and base_mem else ""
            unit = f"{med * 1e3:.3f} ms" if med >= 1e-4 else f"{med * 1e6:.2f} us"
            gbs = extra.get("effective_gb_per_s", "")
            lines.append(f"| {name} | {unit} | {speed} | {_fmt_bytes(mem)} | {mem_ratio} | {gbs} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, help="pytest-benchmark JSON (default: newest)")
    parser.add_argument("--save", action="store_true", help="write it under bench/results/")
    args = parser.parse_args(argv)
    path = args.run or newest_run()
    run = json.loads(path.read_text())
    text = render(run)
    print(text)
    if args.save:
        info = run.get("machine_info", {}).get("unlearnopt", {})
        slug = re.sub(r"[^A-Za-z0-9]+", "-", info.get("device", "unknown")).strip("-").lower()
        stem = f"{slug}-{(info.get('date') or 'undated')[:10]}"
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text + "\n")
        shutil.copy(path, out / f"{stem}.json")
        print(f"saved bench/results/{stem}.md")


if __name__ == "__main__":
    main()
