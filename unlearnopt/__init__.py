"""unlearnopt: fast, exact machine unlearning for large language and multimodal models.

``MultiObjectiveUnlearner`` (the optimizer-style API) and ``unlearnopt.ops`` (the fused ops)
are the entry points; ``unlearnopt.methods`` holds the recipes, ``unlearnopt.eval`` PULSE.
"""

from unlearnopt.errors import UnlearningStepError

__version__ = "0.1.0"

__all__ = ["MultiObjectiveUnlearner", "UnlearningStepError", "__version__"]


def __getattr__(name):
    # Lazy: importing the package must not pull in transformers or build the C++ kernels.
    if name == "MultiObjectiveUnlearner":
        from unlearnopt.unlearner import MultiObjectiveUnlearner

        return MultiObjectiveUnlearner
    raise AttributeError(f"module 'unlearnopt' has no attribute {name!r}")
