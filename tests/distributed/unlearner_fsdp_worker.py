"""Worker of tests/test_unlearner_fsdp.py::test_fsdp2_matches_single_process.

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/distributed/unlearner_fsdp_worker.py OUT METHODS`` (gloo, CPU, float32; METHODS
comma-separated, one launch for all). Every rank builds the same tiny Llama, applies FSDP2
(``fully_shard`` on each decoder layer, then on the whole model; only on the whole model
with ``UNLEARNOPT_TEST_FSDP_WRAP=root``; on the head and the whole model with ``head``)
and takes two ``step()``s on ITS part of the forget and retain batches (uneven sizes and
token counts: rank 0 gets 1 forget / 1 retain sequence, rank 1 the other 2 / 2); the
reference model is a plain local
copy on every rank. Rank 0 also takes the same two steps with an unsharded copy on the
concatenated batches (one process). The sharded parameters are gathered with
``full_tensor()``; rank 0 saves the stats and parameters of both to OUT. The stats also
say whether the steps ran on the fused-linear path (``fused_linear_active``).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.distributed.unlearner_worker import OPTIONS, compare_with_one_process
from unlearnopt.unlearner import MultiObjectiveUnlearner


def run(model, ref, method, forget, retain, fsdp=False):
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        wrap = os.environ.get("UNLEARNOPT_TEST_FSDP_WRAP", "layers")
        if wrap == "layers":
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
        if wrap == "head":  # resharded after its forward: the logits path
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    u = MultiObjectiveUnlearner(model, opt, method, ref_model=ref, **OPTIONS.get(method, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "head" wrap's fallback warning
        stats = [u.step(forget, retain) for _ in range(2)]
    # Whether the steps ran on the fused-linear path (no [B, T, V] logits), for the test.
    stats[-1]["fused_linear_active"] = float(u.heads.active)
    params = [p.detach() for p in model.parameters()]
    if fsdp:
        params = [p.full_tensor() for p in params]  # a collective: every rank calls it
    return stats[-1], [p.clone() for p in params]


if __name__ == "__main__":
    compare_with_one_process(run, torch.float32, fsdp=True)
