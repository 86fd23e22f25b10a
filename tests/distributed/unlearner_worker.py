"""Worker of tests/test_unlearner.py::test_ddp_matches_single_process.

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/distributed/unlearner_worker.py OUT METHODS`` (gloo, CPU, float64; METHODS
comma-separated, one launch for all). Every rank builds
the same tiny Llama, wraps it in DDP and takes two ``step()``s on ITS part of the forget and
retain batches (uneven sizes and token counts: rank 0 gets 1 forget / 1 retain sequence,
rank 1 the other 2 / 2). Rank 0 also takes the same two steps with an unwrapped copy on
the concatenated batches (one process). Every rank sends its stats and parameters to
rank 0, which saves everything to OUT for the test to compare.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.tiny_models import make_batch, make_model
from unlearnopt.unlearner import MultiObjectiveUnlearner

# OFMU's inner step large enough to matter on the tiny model (the default is the lr).
OPTIONS = {"ofmu": {"inner_lr": 0.1}}


def part(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


def run(model, ref, method, forget, retain, ddp=False):
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    u = MultiObjectiveUnlearner(model, opt, method, ref_model=ref, **OPTIONS.get(method, {}))
    stats = [u.step(forget, retain) for _ in range(2)]
    module = model.module if ddp else model
    return stats[-1], [p.detach().clone() for p in module.parameters()]


def compare_with_one_process(run, dtype: torch.dtype, **wrap) -> None:
    """The launch of both unlearner workers: every method on a sharded run (``run(...,
    **wrap)``, each rank on its part of the batches) and, on rank 0, on one process; rank 0
    saves both to ``sys.argv[1]``."""
    out_path, methods = sys.argv[1], sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    torch.manual_seed(0)
    model = make_model("llama", dtype=dtype)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    forget = make_batch("llama", batch=3, seq=8, seed=1, dtype=dtype)
    retain = make_batch("llama", batch=3, seq=8, seed=2, dtype=dtype)
    results = {}
    for method in methods:
        single = None
        if rank == 0:
            stats, params = run(copy.deepcopy(model), ref, method, forget, retain)
            single = {"stats": stats, "params": params}
        lo, hi = (0, 1) if rank == 0 else (1, 3)
        mine = run(
            copy.deepcopy(model), ref, method, part(forget, lo, hi), part(retain, lo, hi), **wrap
        )
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        results[method] = {"single": single, "ranks": gathered}
    if rank == 0:
        results["init"] = [p.detach().clone() for p in model.parameters()]
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    compare_with_one_process(run, torch.float64, ddp=True)
