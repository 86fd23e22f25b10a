"""The one tensor-closeness assertion of the test suite.

Every comparison against a reference goes through :func:`assert_within`: a test computes the
bound its numerics justify (a tolerance per element, or one number) and this module checks it
and, on failure, says how many elements are off and shows the worst one. The bound is the only
thing a test decides; the check and the message are the same everywhere.
"""

from __future__ import annotations

import torch


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def assert_within(what: str, actual, expected, bound) -> None:
    """Assert ``|actual - expected| <= bound`` at every element.

    ``actual`` and ``expected`` are tensors (any dtype and device) of the same shape; they are
    compared in float64 on the CPU. ``bound`` is a float or a tensor broadcastable to that
    shape. Elements that are exactly equal (including equal infinities) always pass; a NaN in
    ``actual`` or ``expected`` that is not matched exactly fails. On failure the message names
    ``what``, how many elements are off, and the worst one (largest error beyond its bound):
    its index, both values, the error and the bound.
    """
    a, e = _as_float64(actual), _as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    b = torch.broadcast_to(_as_float64(bound), e.shape)
    err = torch.where(a == e, torch.zeros_like(a), (a - e).abs())
    ok = err <= b  # False where err or bound is NaN
    if bool(ok.all()):
        return
    excess = torch.where(ok, torch.full_like(err, -torch.inf), (err - b).nan_to_num(torch.inf))
    flat = int(excess.flatten().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), e.shape))
    raise AssertionError(
        f"{what}: {int((~ok).sum())} of {e.numel()} elements off; worst at index {idx}: "
        f"got {a[idx].item()!r}, expected {e[idx].item()!r}, error {err[idx].item():.3e} > "
        f"bound {b[idx].item():.3e}"
    )


def assert_allclose(what: str, actual, expected, *, rtol: float, atol: float) -> None:
    """:func:`assert_within` with the bound ``atol + rtol * |expected|`` per element."""
    assert_within(what, actual, expected, atol + rtol * _as_float64(expected).abs())
