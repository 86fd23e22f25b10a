"""MultiObjectiveUnlearner under FSDP2 (``fully_shard``) on two CPU processes (gloo)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_two_processes

F32_EPS = torch.finfo(torch.float32).eps


@pytest.mark.distributed
def test_fsdp2_matches_single_process(tmp_path):
    """Two steps with the model sharded over 2 ranks (uneven batches per rank) give the
    parameters and stats of one process stepping on the concatenated batches."""
    pytest.importorskip("torch.distributed.fsdp", reason="torch built without distributed")
    methods = ["mollm", "grad_diff", "ofmu"]
    out = tmp_path / "result.pt"
    run_two_processes("unlearner_fsdp_worker.py", str(out), ",".join(methods))
    res = torch.load(out, weights_only=False)
    for method in methods:
        single, ranks = res[method]["single"], res[method]["ranks"]
        for rank_stats, rank_params in ranks:
            assert rank_stats.keys() == single["stats"].keys()
            for k, v in single["stats"].items():
                assert abs(rank_stats[k] - v) <= 1e-5 * (1 + abs(v)), (method, k, rank_stats[k], v)
            for q, (a, b, i) in enumerate(zip(rank_params, single["params"], res["init"])):
                assert a.shape == b.shape == i.shape, (method, q)
                # float32: the update to 1e-5 of its largest entry, plus the rounding of
                # parameters of magnitude |init| (the sharded sums run in another order).
                err = float((a - b).abs().max())
                tol = 1e-5 * float((b - i).abs().max()) + 4 * F32_EPS * float(i.abs().max())
                assert err <= tol, (method, q, err, tol)
