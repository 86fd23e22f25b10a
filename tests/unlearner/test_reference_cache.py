"""``ReferenceCache``: the reference runs once per distinct batch, again for a new batch, a
changed reference or input, and never when caching is off."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import make_batch, make_model
from unlearnopt.output_head import forward_head_inputs
from unlearnopt.unlearner.reference_cache import ReferenceCache, module_fingerprint


class Counting:
    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        with torch.no_grad():
            return forward_head_inputs(
                self.model, {k: v for k, v in batch.items() if k != "labels"}
            )


def _get(cache, ref, batch):
    return cache.get(batch, "head_inputs", module_fingerprint(ref.model), lambda: ref(batch))


def test_reference_runs_once_per_distinct_batch():
    ref = Counting(make_model("llama").eval())
    cache = ReferenceCache()
    forget = make_batch("llama", batch=2, seq=8, seed=0)
    first = _get(cache, ref, forget)
    again = _get(cache, ref, forget)
    assert ref.calls == 1 and again is first
    # The same examples re-collated into new tensors: still a hit (content key).
    _get(cache, ref, {k: v.clone() for k, v in forget.items()})
    assert ref.calls == 1 and cache.hits == 2 and cache.misses == 1
    cache.end_step()
    _get(cache, ref, forget)  # next step, same batch
    assert ref.calls == 1
    other = make_batch("llama", batch=2, seq=8, seed=1)
    _get(cache, ref, other)  # a new batch: runs again
    assert ref.calls == 2 and len(cache) == 2
    cache.end_step()
    _get(cache, ref, other)
    cache.end_step()  # forget was not read: dropped
    assert len(cache) == 1
    _get(cache, ref, forget)
    assert ref.calls == 3


def test_a_changed_input_or_reference_invalidates():
    ref = Counting(make_model("llama").eval())
    cache = ReferenceCache()
    forget = make_batch("llama")
    _get(cache, ref, forget)
    forget["input_ids"][0, 3] += 1  # in place: same tensor object
    _get(cache, ref, forget)
    assert ref.calls == 2
    with torch.no_grad():
        ref.model.lm_head.weight.mul_(2.0)  # the reference changed
    _get(cache, ref, forget)
    assert ref.calls == 3
    _get(cache, ref, forget)
    assert ref.calls == 3
    # What is cached is part of the key.
    cache.get(forget, "log_prob", module_fingerprint(ref.model), lambda: torch.zeros(2))
    assert cache.misses == 4


def test_disabled_cache_always_computes_and_memory_is_counted():
    ref = Counting(make_model("llama").eval())
    off = ReferenceCache(enabled=False)
    forget = make_batch("llama", batch=2, seq=8)
    _get(off, ref, forget)
    _get(off, ref, forget)
    assert ref.calls == 2 and len(off) == 0
    on = ReferenceCache()
    head = _get(on, ref, forget)
    # B * T * H float32 for the hidden states; the weight is the reference's own parameter.
    assert on.nbytes() == 2 * 8 * 32 * 4 == head.hidden.numel() * 4
    on.clear()
    assert len(on) == 0 and on.nbytes() == 0
    with pytest.raises(TypeError, match="enabled"):
        ReferenceCache(enabled=1)
