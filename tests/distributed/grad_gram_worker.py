"""Worker of tests/test_grad_gram.py::test_distributed_matches_single_process.

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/distributed/grad_gram_worker.py OUT BACKEND`` (gloo, CPU). Every rank builds the same
full gradients from a fixed seed, keeps only its shard, and calls ``grad_gram`` on

* DTensors on a 1-D mesh: Shard(0) (uneven and empty shards included), Shard(1), one
  Replicate() tensor (must be counted once) and a None gradient, with ``reduce`` on auto;
* plain local shards (a flat slice per rank) with ``process_group=`` given;
* the same DTensors with ``reduce=False`` (the local Gram, to check nothing is reduced).

Rank 0 writes the results and the full tensors to OUT (torch.save) for the test to compare
with the single-process Gram of the full tensors.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from unlearnopt.ops.grad_gram import grad_gram

SHAPES = [(10, 6), (7,), (1,), (5, 4), (3, 8)]
K = 3


def full_gradients() -> list[list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(1234)
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(K)]
    grads[1][3] = None  # objective 1 does not touch tensor 3
    return grads


def main() -> None:
    out_path, backend = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    placements = [[Shard(0)], [Shard(0)], [Shard(0)], [Replicate()], [Shard(1)]]
    full = full_gradients()
    dtensors = [
        [
            None if g is None else distribute_tensor(g, mesh, placements[p])
            for p, g in enumerate(seq)
        ]
        for seq in full
    ]
    auto = grad_gram(dtensors, backend=backend)
    local_only = grad_gram(dtensors, reduce=False, backend=backend)
    shards = [
        [None if g is None else torch.tensor_split(g.reshape(-1), world)[rank] for g in seq]
        for seq in full
    ]
    plain = grad_gram(shards, process_group=dist.group.WORLD, backend=backend)
    local_sum = local_only.per_tensor.clone()
    dist.all_reduce(local_sum)
    if rank == 0:
        torch.save(
            {
                "full": full,
                "auto": tuple(auto),
                "plain": tuple(plain),
                "local_sum": local_sum,
                "world": world,
            },
            out_path,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
