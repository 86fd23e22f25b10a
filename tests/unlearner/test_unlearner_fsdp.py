"""MultiObjectiveUnlearner under FSDP2 (``fully_shard``) on two CPU processes (gloo)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_two_processes

F32_EPS = torch.finfo(torch.float32).eps


@pytest.mark.distributed
@pytest.mark.parametrize("wrap", ["layers", "root", "head"])
def test_fsdp2_matches_single_process(tmp_path, monkeypatch, wrap):
    """Two steps with the model sharded over 2 ranks (uneven batches per rank) give the
    parameters and stats of one process stepping on the concatenated batches, on the
    fused-linear path (the head's weight read inside the root's forward). ``root``: only
    the whole model is sharded, so FSDP2's backward hooks sit on the model's output alone,
    which the fused objectives reach only through the hidden states' tie to it. ``head``: the
    head is its own unit, resharded after its forward, so the step takes the logits path."""
    monkeypatch.setenv("UNLEARNOPT_TEST_FSDP_WRAP", wrap)
    pytest.importorskip("torch.distributed.fsdp", reason="torch built without distributed")
    methods = ["mollm", "grad_diff", "ofmu"]
    out = tmp_path / "result.pt"
    run_two_processes("unlearner_fsdp_worker.py", str(out), ",".join(methods))
    res = torch.load(out, weights_only=False)
    for method in methods:
        single, ranks = res[method]["single"], res[method]["ranks"]
        for rank_stats, rank_params in ranks:
            assert rank_stats["fused_linear_active"] == float(wrap != "head"), method
            assert rank_stats.keys() == single["stats"].keys()
            for k, v in single["stats"].items():
                if k == "fused_linear_active":  # the single process always fuses
                    continue
                assert abs(rank_stats[k] - v) <= 1e-5 * (1 + abs(v)), (method, k, rank_stats[k], v)
            for q, (a, b, i) in enumerate(zip(rank_params, single["params"], res["init"])):
                assert a.shape == b.shape == i.shape, (method, q)
                # float32: the update to 1e-5 of its largest entry, plus the rounding of
                # parameters of magnitude |init| (the sharded sums run in another order).
                err = float((a - b).abs().max())
                tol = 1e-5 * float((b - i).abs().max()) + 4 * F32_EPS * float(i.abs().max())
                assert err <= tol, (method, q, err, tol)
