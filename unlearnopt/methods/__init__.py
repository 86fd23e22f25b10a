"""Named unlearning recipes: objectives + aggregator + defaults (METHODS.md).

Built-in: ``ga``, ``grad_diff``, ``ga_kl``, ``npo``, ``mollm``, ``siu``, ``ofmu``; each is
imported on first use by :func:`get_method`. Register your own with
:func:`register_method` (see ``unlearnopt.methods.base`` for the contract).
"""

from unlearnopt.methods.base import (
    Method,
    Objective,
    ObjectiveContext,
    available_methods,
    get_method,
    make_method,
    register_method,
)

__all__ = [
    "Method",
    "Objective",
    "ObjectiveContext",
    "available_methods",
    "get_method",
    "make_method",
    "register_method",
]
