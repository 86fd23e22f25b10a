"""The examples in the package's docstrings run (each module's doctests, in the normal suite)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import unlearnopt


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(unlearnopt.__path__, prefix="unlearnopt."):
        spec = importlib.util.find_spec(info.name)
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py"):
            with open(origin, encoding="utf-8") as f:
                if ">>> " in f.read():
                    names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_the_package_has_examples():
    assert len(MODULES) >= 5, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    found = sum(len(t.examples) for t in doctest.DocTestFinder().find(module))
    assert found > 0, f"{name}: no example was found"
    # Examples marked ``+SKIP`` (they need a tokenizer) are found but not attempted.
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
