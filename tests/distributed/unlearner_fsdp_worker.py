"""Worker of tests/test_unlearner_fsdp.py::test_fsdp2_matches_single_process.

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/distributed/unlearner_fsdp_worker.py OUT METHODS`` (gloo, CPU, float32; METHODS
comma-separated, one launch for all). Every rank builds the same tiny Llama, applies FSDP2
(``fully_shard`` on each decoder layer, then on the whole model) and takes two ``step()``s
on ITS part of the forget and retain batches (uneven sizes and token counts: rank 0 gets
1 forget / 1 retain sequence, rank 1 the other 2 / 2); the reference model is a plain local
copy on every rank. Rank 0 also takes the same two steps with an unsharded copy on the
concatenated batches (one process). The sharded parameters are gathered with
``full_tensor()``; rank 0 saves the stats and parameters of both to OUT.
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


def part(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


def run(model, ref, method, forget, retain, fsdp=False):
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    u = MultiObjectiveUnlearner(model, opt, method, ref_model=ref)
    stats = [u.step(forget, retain) for _ in range(2)]
    params = [p.detach() for p in model.parameters()]
    if fsdp:
        params = [p.full_tensor() for p in params]           # a collective: every rank calls it
    return stats[-1], [p.clone() for p in params]


def main() -> None:
    out_path, methods = sys.argv[1], sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    torch.manual_seed(0)
    model = make_model("llama", dtype=torch.float32)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    forget = make_batch("llama", batch=3, seq=8, seed=1, dtype=torch.float32)
    retain = make_batch("llama", batch=3, seq=8, seed=2, dtype=torch.float32)
    results = {}
    for method in methods:
        single = None
        if rank == 0:
            stats, params = run(copy.deepcopy(model), ref, method, forget, retain)
            single = {"stats": stats, "params": params}
        lo, hi = (0, 1) if rank == 0 else (1, 3)
        mine = run(copy.deepcopy(model), ref, method, part(forget, lo, hi),
                   part(retain, lo, hi), fsdp=True)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        results[method] = {"single": single, "ranks": gathered}
    if rank == 0:
        results["init"] = [p.detach().clone() for p in model.parameters()]
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
