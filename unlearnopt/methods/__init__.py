"""Named unlearning recipes: objectives + aggregator + defaults.

Built-in: ``ga``, ``grad_diff``, ``ga_kl``, ``npo``, ``mollm``, ``siu``, ``ofmu``, ``simnpo``,
``wga``, ``satimp``, ``ce_u``, ``undial``, ``rmu``, ``idk_dpo``; each is
imported on first use by :func:`get_method`. Register your own with
:func:`register_method` (see ``unlearnopt.methods.base`` for how to write one, and
``unlearnopt.contract`` for what a method may rely on).
"""

from unlearnopt.contract import Objective, ObjectiveContext
from unlearnopt.methods.base import Method
from unlearnopt.methods.registry import (
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
