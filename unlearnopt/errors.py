"""The errors an unlearning step raises beyond ``ValueError`` / ``TypeError``."""

from __future__ import annotations


class UnlearningStepError(RuntimeError):
    """A step that could not be taken (non-finite loss or gradient). Nothing was changed:
    the parameters, the optimizer state and every ``p.grad`` are as they were."""
