"""The shared closeness assertion: it passes inside the bound and reports the worst element."""

from __future__ import annotations

import math

import pytest
import torch

from tests.assertions import assert_allclose, assert_within


def test_passes_within_a_per_element_or_scalar_bound():
    expected = torch.tensor([[1.0, 2.0], [3.0, math.inf]])
    actual = expected + torch.tensor([[0.125, -0.25], [0.0, 0.0]])
    assert_within("x", actual, expected, torch.tensor([0.125, 0.25]))
    assert_within("x", actual.float(), expected, 0.25)
    assert_allclose("x", actual, expected, rtol=0.125, atol=0.0)


def test_reports_count_and_worst_element():
    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[0, 1], actual[1, 2] = 0.5, 3.0
    with pytest.raises(
        AssertionError,
        match=r"x: 2 of 6 elements off; worst at index \(1, 2\): "
        r"got 3.0, expected 0.0, error 3.000e\+00 > bound",
    ):
        assert_within("x", actual, expected, 0.1)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_mismatch_fails(bad):
    with pytest.raises(AssertionError, match="1 of 2 elements off"):
        assert_within("x", torch.tensor([1.0, bad]), torch.tensor([1.0, 2.0]), 1e30)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape"):
        assert_within("x", torch.zeros(3), torch.zeros(1), 1.0)
