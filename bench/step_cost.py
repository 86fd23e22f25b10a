"""Step cost of several methods relative to GA, timed in interleaved rounds.

    python -m bench.step_cost [METHOD ...]          # default: ga grad_diff mollm ofmu

Interleaving (ga, then each method, round after round) exposes every method to the same
machine load, and the minimum over rounds is the least noisy estimate. ``--cpu`` times the
process's CPU time with one thread instead of the wall clock (steadier on a shared machine).
The model and batches are those of ``bench/test_bench_step.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.test_bench_step import METHODS, make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "methods", nargs="*", default=["grad_diff", "mollm", "ofmu"], help=f"any of {METHODS}"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cpu", action="store_true", help="CPU time, one thread")
    args = parser.parse_args()
    clock = time.process_time if args.cpu else time.perf_counter
    if args.cpu:
        torch.set_num_threads(1)
    names = ["ga", *[m for m in args.methods if m != "ga"]]
    runs = {name: make(name) for name in names}
    for unlearner, forget, retain in runs.values():
        unlearner.step(forget, retain)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            unlearner, forget, retain = runs[name]
            start = clock()
            unlearner.step(forget, retain)
            times[name].append(clock() - start)
    ga = min(times["ga"])
    for name in names:
        print(
            f"{name:18s} min {1e3 * min(times[name]):9.1f} ms   x GA {min(times[name]) / ga:6.2f}"
        )


if __name__ == "__main__":
    main()
