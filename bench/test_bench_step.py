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
``UNLEARNOPT_BENCH_QUICK=1``: hidden 64, vocab 512, 32 tokens. Both rows run the objectives
on the unlearner's fused-linear path (its default: no ``[B, T, V]`` logits).

``test_step_large_vocab``: peak memory and time of one ``step()`` of ga, npo, mollm and siu
at Llama-3's vocabulary (V = 128256; hidden 256, 2 layers, 8 x 256 tokens per batch) against
a plain PyTorch loop doing the same objectives the way a hand-written trainer does: full
``[B, T, V]`` logits of the model and of the reference, ``log_softmax`` / ``cross_entropy``,
the objectives summed with the method's fixed weights (mollm: weight 1 each; unlearnopt
keeps its K gradients apart and weighs them by min-norm), one backward, the optimizer step.
``extra_info``: ``peak_extra_bytes`` and ``step_ms`` of each, and on the unlearnopt row
``memory_ratio`` / ``time_ratio`` to the plain loop (goal: <= 0.40 at <= 1.0). Quick mode:
V = 16384, hidden 64, 2 x 64 tokens.
"""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch

from bench.conftest import DEVICE, QUICK, peak_extra_bytes, record, seconds, synchronize
from unlearnopt.unlearner import MultiObjectiveUnlearner

METHODS = ["ga", "grad_diff", "ga_kl", "npo", "mollm", "mollm_per_tensor", "ofmu", "ofmu_exact"]
# Variants of a method: (registered name, options).
VARIANTS = {
    "mollm_per_tensor": ("mollm", {"granularity": "per_tensor"}),
    "ofmu_exact": ("ofmu", {"hvp": "finite_difference", "inner_steps": 5}),
}
HIDDEN, VOCAB, SEQ = (64, 512, 32) if QUICK else (128, 2048, 64)


@functools.cache
def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * SEQ,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(DEVICE)


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 4] = -100
    return {
        k: v.to(DEVICE)
        for k, v in {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
        }.items()
    }


def make(method: str):
    model = copy.deepcopy(base_model())
    ref = copy.deepcopy(base_model())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    name, opts = VARIANTS.get(method, (method, {}))
    unlearner = MultiObjectiveUnlearner(model, opt, name, ref_model=ref, **opts)
    return unlearner, batch(1), batch(2)


def passes(unlearner, forget, retain, backward: bool = True) -> None:
    """The forward passes and K backward passes a hand-written loop needs anyway."""
    objectives = unlearner.method.objectives()
    for kind, b in (("forget", forget), ("retain", retain)):
        objs = [o for o in objectives if o.batch == kind]
        ctx = unlearner.engine.context(b, kind)  # the same (fused-linear) path as step()
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
    info = {"impl": impl, "method": method, "k": k, "params": numel, "peak_extra_bytes": extra}
    if impl == "unlearnopt":
        t_step = seconds(benchmark, "min")
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
        info.update(
            aggregation_ms=round(1e3 * t_agg, 3),
            aggregation_per_backward=round(t_agg / one_backward, 3),
        )
        info.update(
            step_ms=round(1e3 * t_step, 3),
            passes_ms=round(1e3 * t_passes, 3),
            forwards_ms=round(1e3 * t_fwd, 3),
            overhead_ms=round(1e3 * overhead, 3),
            overhead_per_backward=round(overhead / one_backward, 3),
        )
    record(benchmark, **info)


# -- large vocabulary: unlearnopt's step against a plain PyTorch loop ---------------------------

LARGE_METHODS = ["ga", "npo", "mollm", "siu"]
L_VOCAB, L_HIDDEN, L_BATCH, L_SEQ = (16384, 64, 2, 64) if QUICK else (128256, 256, 8, 256)


@functools.cache
def large_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=L_VOCAB,
        hidden_size=L_HIDDEN,
        intermediate_size=4 * L_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=L_SEQ,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(DEVICE)


def large_batch(seed: int, siu: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, L_VOCAB, (L_BATCH, L_SEQ), generator=g)
    labels = ids.clone()
    labels[:, : L_SEQ // 4] = -100
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if siu:
        out["token_mask"] = labels != -100
        vocab_mask = torch.ones(L_VOCAB)
        vocab_mask[ids[0, -4:]] = 0.0
        out["vocab_mask"] = vocab_mask
    return {k: v.to(DEVICE) for k, v in out.items()}


def _inputs(b):
    return {k: v for k, v in b.items() if k not in ("labels", "token_mask", "vocab_mask")}


def _token_log_probs(logits, labels):
    """log p(y_t) ``[B, T-1]`` of the shifted labels (0 where ignored), plain PyTorch."""
    logp = logits[:, :-1].float().log_softmax(-1)
    y = labels[:, 1:]
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (y != -100)


def plain_step(method, model, ref, opt, forget, retain):
    """One step of ``method`` as a hand-written loop writes it (full logits, one backward)."""
    f_logits = model(**_inputs(forget), use_cache=False).logits
    f_mask = forget["labels"][:, 1:] != -100
    if method == "ga":
        loss = _token_log_probs(f_logits, forget["labels"]).sum() / f_mask.sum()
    elif method == "npo":
        with torch.no_grad():
            r_logits = ref(**_inputs(forget), use_cache=False).logits
        ratio = _token_log_probs(f_logits, forget["labels"]).sum(1) - _token_log_probs(
            r_logits, forget["labels"]
        ).sum(1)
        loss = (2.0 / 0.1) * torch.nn.functional.softplus(0.1 * ratio).mean()
    elif method == "mollm":
        p = _token_log_probs(f_logits, forget["labels"]).exp()
        uce = (-torch.log1p(-0.5 * p) * f_mask).sum() / f_mask.sum()
        r_logits = model(**_inputs(retain), use_cache=False).logits
        with torch.no_grad():
            q_logits = ref(**_inputs(retain), use_cache=False).logits
        r_mask = retain["labels"][:, 1:] != -100
        lp = r_logits[:, :-1].float().log_softmax(-1)[r_mask]
        lq = q_logits[:, :-1].float().log_softmax(-1)[r_mask]
        kl = (lq.exp() * (lq - lp)).sum(-1).mean()
        nll = -_token_log_probs(r_logits, retain["labels"]).sum() / r_mask.sum()
        loss = uce + kl + nll
    else:  # siu
        ce = -_token_log_probs(f_logits, forget["labels"]).sum() / f_mask.sum()
        with torch.no_grad():
            r_logits = ref(**_inputs(forget), use_cache=False).logits
        m = forget["token_mask"][:, 1:]
        lp = f_logits[:, :-1].float().log_softmax(-1)[m]
        lq = r_logits[:, :-1].float().log_softmax(-1)[m]
        dmk = (forget["vocab_mask"] * lq.exp() * (lq - lp)).sum(-1).mean()
        loss = 0.9 * ce + 0.75 * dmk
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("impl", ["plain", "unlearnopt"])
@pytest.mark.parametrize("method", LARGE_METHODS)
def test_step_large_vocab(benchmark, method, impl):
    model = copy.deepcopy(large_model())
    ref = copy.deepcopy(large_model()).eval().requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    forget, retain = large_batch(1, siu=method == "siu"), large_batch(2)
    benchmark.group = f"step V={L_VOCAB} {method} tokens={L_BATCH}x{L_SEQ} hidden={L_HIDDEN}"
    if impl == "plain":

        def fn():
            plain_step(method, model, ref, opt, forget, retain)
            synchronize()
    else:
        unlearner = MultiObjectiveUnlearner(model, opt, method, ref_model=ref)

        def fn():
            unlearner.step(forget, retain)
            synchronize()

    fn()  # warm-up (kernels built/loaded; the reference cache filled, as in a request)
    extra = peak_extra_bytes(fn)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    info = {
        "impl": impl,
        "method": method,
        "vocab": L_VOCAB,
        "peak_extra_bytes": extra,
        "step_ms": round(1e3 * seconds(benchmark, "min"), 3),
    }
    if impl == "unlearnopt":
        assert unlearner.heads.active, unlearner.heads.reason
        plain_model = copy.deepcopy(large_model())
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-4)

        def plain():
            plain_step(method, plain_model, ref, plain_opt, forget, retain)
            synchronize()

        plain()
        plain_extra = peak_extra_bytes(plain)
        plain_time = min_time(plain, rounds=3)
        info.update(
            plain_peak_extra_bytes=plain_extra,
            plain_step_ms=round(1e3 * plain_time, 3),
            memory_ratio=round(extra / max(plain_extra, 1), 3),
            time_ratio=round(seconds(benchmark, "min") / plain_time, 3),
        )
    record(benchmark, **info)
