"""Shared benchmark setup: device, peak-memory measurement, and result metadata.

Run with ``pytest bench/``. Results go to ``.benchmarks/`` (pytest-benchmark autosave);
``python -m bench.report`` renders the latest run as a markdown table with ratios.
Set ``UNLEARNOPT_BENCH_QUICK=1`` for a short smoke run (smallest sizes only).
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from datetime import datetime, timezone

import torch

if not torch.cuda.is_available():
    # Triton kernels are not benchmarked on CPU (the interpreter is not a speed path).
    os.environ.pop("TRITON_INTERPRET", None)

DEVICE = torch.device(
    os.environ.get("UNLEARNOPT_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
)
QUICK = os.environ.get("UNLEARNOPT_BENCH_QUICK", "0") not in ("", "0")


def pytest_configure(config):
    # Keep every run's JSON so that bench/report.py can render it.
    if not config.getoption("benchmark_autosave", default=False):
        config.option.benchmark_autosave = True


def pytest_benchmark_update_machine_info(config, machine_info):
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    machine_info["unlearnopt"] = {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "liger_kernel": version("liger-kernel"),
        "python": sys.version.split()[0],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
    }


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn) -> int:
    """Peak memory ``fn()`` needs beyond what was allocated before it ran.

    CUDA: the caching allocator's peak. CPU (Linux): the resident-set high-water mark,
    reset through ``/proc/self/clear_refs`` just before the call, minus the resident set
    at that moment; large tensors are mmapped, so their pages count while they live.
    """
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    base = _rss_bytes("VmRSS:")
    fn()
    return max(0, _rss_bytes("VmHWM:") - base)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def seconds(benchmark, stat: str = "median") -> float:
    """The benchmark's ``stat`` (``"median"``, ``"min"``) in seconds; NaN when pytest ran
    with ``--benchmark-disable`` (each function once, untimed, as a smoke test)."""
    stats = benchmark.stats
    return float("nan") if stats is None else float(getattr(stats.stats, stat))


def record(benchmark, **info) -> None:
    """Attach figures to a benchmark result (shown by bench/report.py)."""
    benchmark.extra_info.update(info)


def peak_bandwidth_bytes_per_s() -> float:
    """The device's copy bandwidth: published peak on GPU, a measured large copy on CPU."""
    if DEVICE.type == "cuda":
        name = torch.cuda.get_device_name(DEVICE)
        return 4.8e12 if "H200" in name else 3.35e12 if "H100" in name else float("nan")
    import time

    src = torch.empty(64 * 2**20, dtype=torch.float32).fill_(1.0)  # 256 MiB
    dst = torch.empty_like(src).fill_(0.0)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best
