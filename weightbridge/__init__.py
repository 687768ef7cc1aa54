"""weightbridge: map deep-learning weights between model implementations, streaming.

Two phases, never mixed: plan from metadata (names, shapes, dtypes), then stream bytes.
"""

from __future__ import annotations

from weightbridge.adapt import adapt
from weightbridge.errors import (
    ConversionError,
    FormatError,
    MatchError,
    PlanError,
    SpecError,
    VerifyError,
    WeightbridgeError,
)
from weightbridge.spec import CheckpointSpec, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "CheckpointSpec",
    "ConversionError",
    "FormatError",
    "MatchError",
    "PlanError",
    "SpecError",
    "TensorSpec",
    "VerifyError",
    "WeightbridgeError",
    "adapt",
]
