"""The examples in docstrings run (the frameworks' adapters run theirs where installed)."""

from __future__ import annotations

import doctest
import importlib

import pytest

CORE = ["dtypes", "spec", "ops", "planner", "layouts", "stream", "api"]


@pytest.mark.parametrize("module", CORE)
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module(f"weightbridge.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 or module in ("api",), f"{module} has no examples"
    assert result.failed == 0


@pytest.mark.torch
def test_torch_adapter_examples() -> None:
    result = doctest.testmod(importlib.import_module("weightbridge.frameworks.torch"))
    assert result.attempted > 0 and result.failed == 0
