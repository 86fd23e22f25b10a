"""Benchmarks of the batched min-norm (MGDA) solver against looped solvers.

    pytest bench/test_bench_min_norm.py --benchmark-only

Batched solvers (native and reference on CPU; triton when CUDA is present) for B in
{1, 1024, 65536} and K in {2, 3, 4, 8}. Baselines, per problem: scipy NNLS looped over
200 problems (exact; the reformulation of tests/hard_grams.py), TorchJD's MGDA looped and
qpth batched only when importable. ``extra_info`` holds the per-problem time, the worst
KKT residual and the speed-up over looped scipy.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from bench.conftest import QUICK, seconds
from tests.hard_grams import nnls_min_norm
from unlearnopt.ops.min_norm import kkt_residual, min_norm

BATCHES = (1, 1024) if QUICK else (1, 1024, 65536)
KS = (2, 3) if QUICK else (2, 3, 4, 8)
LOOPED = 200  # problems timed for the looped baselines


def _grams(b: int, k: int, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(b * 10 + k)
    g = torch.randn(b, k, 64, generator=gen)
    # Norms spanning 1e-1..1e1, the regime the MOLLM aggregator sees without rescaling.
    g = g * 10 ** (2 * torch.rand(b, k, 1, generator=gen) - 1)
    return (g @ g.transpose(-1, -2)).to(device)


def _backends():
    out = [("reference", "cpu")]
    from unlearnopt.native import native_error

    if native_error() is None:
        out.append(("native", "cpu"))
    if torch.cuda.is_available():
        out.append(("triton", "cuda"))
    return out


@functools.cache
def scipy_per_problem_s(k: int) -> float:
    grams = _grams(LOOPED, k).double().numpy()
    nnls_min_norm(grams[0])  # imports scipy.optimize outside the timing
    start = time.perf_counter()
    for g in grams:
        nnls_min_norm(g)
    return (time.perf_counter() - start) / LOOPED


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("backend,device", _backends())
def test_bench_min_norm(benchmark, backend, device, b, k):
    if backend == "reference" and b == 65536 and k > 4:
        pytest.skip("reference enumeration at K=8, B=65536 takes tens of seconds per call")
    gram = _grams(b, k, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        out = min_norm(gram, backend=backend, check=False)
        sync()
        return out

    run()  # build / compile / warm up
    rounds = 1 if b == 65536 and backend == "reference" else 5
    out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    per_problem = seconds(benchmark) / b
    benchmark.extra_info.update(
        backend=backend,
        device=device,
        B=b,
        K=k,
        torch=torch.__version__,
        per_problem_us=per_problem * 1e6,
        kkt_max=float(kkt_residual(gram, out.weights).max()),
        scipy_nnls_per_problem_us=scipy_per_problem_s(k) * 1e6,
        speedup_vs_scipy_looped=scipy_per_problem_s(k) / per_problem,
        date=time.strftime("%Y-%m-%d"),
    )


@pytest.mark.parametrize("k", KS)
def test_bench_scipy_nnls_looped(benchmark, k):
    grams = _grams(LOOPED, k).double().numpy()
    benchmark.pedantic(lambda: [nnls_min_norm(g) for g in grams], rounds=3, iterations=1)
    benchmark.extra_info.update(
        K=k, problems=LOOPED, per_problem_us=seconds(benchmark) / LOOPED * 1e6
    )


@pytest.mark.parametrize("k", KS)
def test_bench_torchjd_mgda_looped(benchmark, k):
    pytest.importorskip("torchjd")
    from torchjd.aggregation import MGDA

    gen = torch.Generator().manual_seed(k)
    jacobians = [torch.randn(k, 64, generator=gen) for _ in range(LOOPED)]
    agg = MGDA()
    benchmark.pedantic(lambda: [agg(j) for j in jacobians], rounds=3, iterations=1)
    benchmark.extra_info.update(
        K=k, problems=LOOPED, per_problem_us=seconds(benchmark) / LOOPED * 1e6
    )


@pytest.mark.parametrize("k", KS)
def test_bench_qpth_batched(benchmark, k):
    pytest.importorskip("qpth")
    from qpth.qp import QPFunction

    b = 1024
    gram = _grams(b, k).double()
    eye = torch.eye(k, dtype=torch.float64)
    q = torch.zeros(b, k, dtype=torch.float64)
    a = torch.ones(b, 1, k, dtype=torch.float64)
    one = torch.ones(b, 1, dtype=torch.float64)
    qp = QPFunction(verbose=False)
    benchmark.pedantic(
        lambda: qp(
            2 * gram + 1e-9 * eye,
            q,
            -eye.expand(b, k, k),
            torch.zeros(b, k, dtype=torch.float64),
            a,
            one,
        ),
        rounds=3,
        iterations=1,
    )
    benchmark.extra_info.update(K=k, B=b, per_problem_us=seconds(benchmark) / b * 1e6)
