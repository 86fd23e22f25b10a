"""The cost of ``MultiObjectiveUnlearner.step()`` beyond the passes it cannot avoid.

For every method, on a small random Llama (hidden 128, 2 layers, vocab 2048; batch 2 x 64
tokens per forget/retain batch; SGD):

* ``passes``: the same forward passes (forget, retain, reference) and the same K backward
  passes of the same objective losses, accumulated straight into ``p.grad``, then the
  optimizer step: what a hand-written loop must do anyway;
* ``unlearnopt``: one ``step()`` (per-objective gradients kept apart, Gram, weights,
  combination, finiteness checks, the optimizer step).

``extra_info`` of the ``unlearnopt`` row: ``overhead_ms`` = step - passes (minimum over
rounds: on a shared, loaded machine the minimum is the least noisy estimate), and
``overhead_per_backward`` = that overhead over the time of ONE backward pass (measured as
(passes - forwards) / K); the goal is <= 0.10. ``aggregation_ms`` times the aggregation
alone (Gram, weights, combination, the host sync) on real gradients, the figure least
exposed to machine noise. Also the peak extra memory of each.
``UNLEARNOPT_BENCH_QUICK=1``: hidden 64, vocab 512, 32 tokens.
"""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch

from bench.conftest import DEVICE, QUICK, peak_extra_bytes, record, synchronize
from unlearnopt.contract import ObjectiveContext
from unlearnopt.unlearner import MultiObjectiveUnlearner

METHODS = ["ga", "grad_diff", "ga_kl", "npo", "mollm", "mollm_per_tensor"]
HIDDEN, VOCAB, SEQ = (64, 512, 32) if QUICK else (128, 2048, 64)


@functools.cache
def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2 * SEQ, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(DEVICE)


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 4] = -100
    return {k: v.to(DEVICE) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def make(method: str):
    model = copy.deepcopy(base_model())
    ref = copy.deepcopy(base_model())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    opts = {"granularity": "per_tensor"} if method == "mollm_per_tensor" else {}
    name = "mollm" if method == "mollm_per_tensor" else method
    unlearner = MultiObjectiveUnlearner(model, opt, name, ref_model=ref, **opts)
    return unlearner, batch(1), batch(2)


def passes(unlearner, forget, retain, backward: bool = True) -> None:
    """The forward passes and K backward passes a hand-written loop needs anyway."""
    objectives = unlearner.method.objectives()
    for kind, b in (("forget", forget), ("retain", retain)):
        objs = [o for o in objectives if o.batch == kind]
        ctx = ObjectiveContext(b, kind, unlearner.forward, unlearner.ref_forward)
        for j, o in enumerate(objs):
            loss = o.loss(ctx)
            if backward:
                loss.backward(retain_graph=j < len(objs) - 1)
    if backward:
        unlearner.optimizer.step()
        unlearner.optimizer.zero_grad(set_to_none=True)
    synchronize()


def min_time(fn, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@pytest.mark.parametrize("impl", ["passes", "unlearnopt"])
@pytest.mark.parametrize("method", METHODS)
def test_step(benchmark, method, impl):
    unlearner, forget, retain = make(method)
    k = len(unlearner.method.objectives())
    numel = sum(p.numel() for p in unlearner.params)
    benchmark.group = f"step {method} K={k} params={numel / 1e6:.2f}M tokens={2 * SEQ}x2"

    def run_step():
        unlearner.step(forget, retain)
        synchronize()

    def run_passes():
        passes(unlearner, forget, retain)

    fn = run_step if impl == "unlearnopt" else run_passes
    fn()  # warm-up (kernels built/loaded)
    extra = peak_extra_bytes(fn)
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
    info = {"impl": impl, "method": method, "k": k, "params": numel,
            "peak_extra_bytes": extra}
    if impl == "unlearnopt":
        t_step = benchmark.stats.stats.min
        t_passes = min_time(run_passes)
        t_fwd = min_time(lambda: passes(unlearner, forget, retain, backward=False))
        one_backward = max((t_passes - t_fwd) / k, 1e-9)
        overhead = t_step - t_passes
        # The aggregation alone (Gram, weights, combination, the one sync), timed on real
        # gradients: less exposed to the noise of the passes on a shared machine.
        objectives = unlearner.method.objectives()
        _, grads = unlearner.objective_gradients(objectives, forget, retain)
        agg = unlearner.method.aggregator()

        def aggregate():
            gram = unlearner.gram(grads)
            res = agg.coefficients(gram.per_tensor, gram.total)
            agg.combine(grads, res.coefficients)
            torch.cat([gram.total.reshape(-1), res.weights.reshape(-1)]).tolist()

        t_agg = min_time(aggregate)
        info.update(aggregation_ms=round(1e3 * t_agg, 3),
                    aggregation_per_backward=round(t_agg / one_backward, 3))
        info.update(step_ms=round(1e3 * t_step, 3), passes_ms=round(1e3 * t_passes, 3),
                    forwards_ms=round(1e3 * t_fwd, 3), overhead_ms=round(1e3 * overhead, 3),
                    overhead_per_backward=round(overhead / one_backward, 3))
    record(benchmark, **info)
