"""Worker of tests/test_unlearner_fused_linear.py::test_ddp_fused_linear_matches_logits_path.

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/distributed/fused_linear_worker.py OUT METHODS`` (gloo, CPU, float64). The launch of
``unlearner_worker``: every rank takes two steps of a DDP-wrapped tiny Llama on ITS part of
the batches on the fused-linear path (the default), and rank 0 takes them on one process on
the whole batches on the logits path (``fused_linear=False``); rank 0 saves both to OUT.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.distributed.unlearner_worker import compare_with_one_process
from unlearnopt.unlearner import MultiObjectiveUnlearner


def run(model, ref, method, forget, retain, ddp=False):
    """DDP on the fused-linear path, or one process on the logits path."""
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    u = MultiObjectiveUnlearner(model, opt, method, ref_model=ref, fused_linear=ddp)
    assert u.heads.active == ddp
    stats = [u.step(forget, retain) for _ in range(2)]
    assert u.heads.active == ddp
    module = model.module if ddp else model
    return stats[-1], [p.detach().clone() for p in module.parameters()]


if __name__ == "__main__":
    compare_with_one_process(run, torch.float64, ddp=True)
