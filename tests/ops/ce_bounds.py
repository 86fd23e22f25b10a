"""The error bound of an unlearning cross-entropy output against its float64 oracle, shared by
the logits and fused-linear tests."""

from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of ``x`` (float64)."""
    info = torch.finfo(dtype)
    mag = x.abs().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def oracle_bound(ref_low: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far from the float64 ``oracle`` an output in ``dtype`` may be (float64, per element):
    twice the error of the reference run in the same dtype (``ref_low``), plus one rounding of
    the output (a kernel may round once differently)."""
    ref_low, oracle = ref_low.double(), oracle.double()
    scale = oracle.abs().max().clamp(min=1e-30)
    # exp(z - lse) with |z - lse| up to ~60 carries ~60 fp32 ulps of relative error,
    # whichever backend computes it: that is the margin beyond the reference's own error.
    return 2 * (ref_low - oracle).abs() + ulp(oracle, dtype) + 64 * FP32_EPS * scale
