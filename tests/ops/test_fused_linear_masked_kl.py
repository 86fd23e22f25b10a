"""fused_linear_masked_kl: every backend against the reference on the full logits."""

from __future__ import annotations

import pytest
import torch

from tests.assertions import assert_allclose
from tests.conftest import seeded
from tests.ops.test_masked_kl import make_masks
from unlearnopt.ops.fused_linear_masked_kl import fused_linear_masked_kl
from unlearnopt.reference import masked_kl as ref


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(backend, device, reduction, with_bias):
    g = seeded(3)
    n, h, h_ref, vocab = 11, 8, 6, 37
    hidden = torch.randn(n, h, generator=g).to(device)
    weight = torch.randn(vocab, h, generator=g).to(device)
    bias = torch.randn(vocab, generator=g).to(device) if with_bias else None
    ref_hidden = torch.randn(n, h_ref, generator=g).to(device)
    ref_weight = torch.randn(vocab, h_ref, generator=g).to(device)
    ref_bias = torch.randn(vocab, generator=g).to(device) if with_bias else None
    tmask, vmask = make_masks("float", True, (n,), vocab, device=device)

    def run(fn, dtype, **extra):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (hidden, weight)]
        b = bias.detach().to(dtype).clone().requires_grad_() if with_bias else None
        loss = fn(
            leaves[0],
            leaves[1],
            ref_hidden.to(dtype),
            ref_weight.to(dtype),
            b,
            None if ref_bias is None else ref_bias.to(dtype),
            token_mask=tmask,
            vocab_mask=vmask,
            direction="reverse",
            reduction=reduction,
            temperature=1.3,
            **extra,
        )
        up = torch.randn(loss.shape, generator=seeded(9)).to(device)
        (loss * up).sum().backward()
        return [loss.detach()] + [t.grad for t in leaves] + ([b.grad] if with_bias else [])

    got = run(fused_linear_masked_kl, torch.float32, chunk_size=4, backend=backend)
    want = run(ref.fused_linear_masked_kl, torch.float64)
    for name, a, e in zip(("loss", "hidden", "weight", "bias"), got, want):
        assert_allclose(f"fused linear {name}", a, e, rtol=1e-4, atol=1e-5)


def test_errors(device):
    w = torch.randn(10, 3, device=device)
    h = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match="ref_weight"):
        fused_linear_masked_kl(h, w, h, w[:9])
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_masked_kl(h[:, :2], w, h, w)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_masked_kl(h, w, h, w, chunk_size=0)
