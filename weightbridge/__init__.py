"""weightbridge: map deep-learning weights between model implementations, streaming.

Two phases, never mixed: plan from metadata (names, shapes, dtypes), then stream bytes.

`adapt`, `diff`, `DiffReport`, `CheckpointSpec` and `TensorSpec` are imported on first use, so
that importing the package (and `weightbridge --version`) does not pay for numpy and ml_dtypes.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from weightbridge.errors import (
    ConversionError,
    FormatError,
    MatchError,
    PlanError,
    SpecError,
    VerifyError,
    WeightbridgeError,
)

if TYPE_CHECKING:
    from weightbridge.adapt import adapt
    from weightbridge.compare import DiffReport, diff
    from weightbridge.spec import CheckpointSpec, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "CheckpointSpec",
    "ConversionError",
    "DiffReport",
    "FormatError",
    "MatchError",
    "PlanError",
    "SpecError",
    "TensorSpec",
    "VerifyError",
    "WeightbridgeError",
    "adapt",
    "diff",
]

# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "adapt": "weightbridge.adapt",
    "CheckpointSpec": "weightbridge.spec",
    "TensorSpec": "weightbridge.spec",
    "diff": "weightbridge.compare",
    "DiffReport": "weightbridge.compare",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'weightbridge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _Package(types.ModuleType):
    """Keeps `weightbridge.adapt` the function: importing the submodule of the same name
    (``import weightbridge.adapt``) would otherwise set the package's attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "adapt" and isinstance(value, types.ModuleType):
            value = value.adapt
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
