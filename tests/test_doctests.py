"""The examples in docstrings run (the frameworks' adapters run theirs where installed)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import weightbridge

# Every core module, found by walking the package (so moving a module cannot drop its examples);
# the framework adapters import their framework and run below, under its marker.
CORE = sorted(
    m.name
    for m in pkgutil.walk_packages(weightbridge.__path__, "weightbridge.")
    if not m.name.startswith("weightbridge.frameworks") and m.name != "weightbridge.__main__"
)


@pytest.mark.parametrize("module", CORE)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0


def test_the_core_has_examples() -> None:
    finder = doctest.DocTestFinder()
    with_examples = [
        m for m in CORE if any(t.examples for t in finder.find(importlib.import_module(m)))
    ]
    assert len(with_examples) >= 6, with_examples


@pytest.mark.torch
def test_torch_adapter_examples() -> None:
    result = doctest.testmod(importlib.import_module("weightbridge.frameworks.torch"))
    assert result.attempted > 0 and result.failed == 0
