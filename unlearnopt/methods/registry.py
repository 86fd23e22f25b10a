"""The registry of named methods: ``register_method``, ``get_method``, ``available_methods``,
``make_method``.

Built-in methods are imported on first use (``get_method("mollm")`` imports
``unlearnopt.methods.mollm``, which registers itself), so importing one does not import all.
"""

from __future__ import annotations

import importlib
from typing import Any

from unlearnopt.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_BUILTIN_MODULES = {
    "ga": "unlearnopt.methods.ga",
    "grad_diff": "unlearnopt.methods.grad_diff",
    "ga_kl": "unlearnopt.methods.ga_kl",
    "npo": "unlearnopt.methods.npo",
    "mollm": "unlearnopt.methods.mollm",
    "siu": "unlearnopt.methods.siu",
    "ofmu": "unlearnopt.methods.ofmu",
    "simnpo": "unlearnopt.methods.simnpo",
    "wga": "unlearnopt.methods.token_forget",
    "satimp": "unlearnopt.methods.token_forget",
    "ce_u": "unlearnopt.methods.token_forget",
    "undial": "unlearnopt.methods.token_forget",
    "rmu": "unlearnopt.methods.rmu",
    "idk_dpo": "unlearnopt.methods.idk_dpo",
}


def register_method(name: str, cls: type[Method], *, overwrite: bool = False) -> type[Method]:
    """Register ``cls`` under ``name`` (``overwrite=True`` to replace an existing one).

    Usable as a plain call or from a module that defines a built-in method.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"cls must be a subclass of Method, got {cls!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls and not overwrite:
        raise ValueError(
            f"a method named {name!r} is already registered "
            f"({_REGISTRY[name].__qualname__}); pass overwrite=True to replace it"
        )
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (built-ins are imported on demand)."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Registered names plus the built-in names (sorted)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def make_method(method: str | Method | type[Method], **config: Any) -> Method:
    """A method instance from a name, a class or an instance (config only with name/class)."""
    if isinstance(method, Method):
        if config:
            raise TypeError(
                f"options {sorted(config)} given with a Method instance; "
                "configure the instance instead"
            )
        return method
    if isinstance(method, str):
        return get_method(method)(**config)
    if isinstance(method, type) and issubclass(method, Method):
        return method(**config)
    raise TypeError(f"method must be a name, a Method subclass or instance, got {method!r}")
