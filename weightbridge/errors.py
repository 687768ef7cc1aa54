"""The exceptions weightbridge raises: one base class and a few named kinds.

Every message says what went wrong, where (file, tensor), what was expected and what was
found, and what to do about it. Callers catch `WeightbridgeError`; the CLI turns it into a
one-line message and exit code 2 instead of a traceback.
"""

from __future__ import annotations


class WeightbridgeError(Exception):
    """Base class of every error weightbridge raises on purpose."""


class FormatError(WeightbridgeError):
    """A checkpoint file is malformed, truncated, unsupported or unsafe."""


class UnknownFormatError(FormatError):
    """No reader recognises a path."""


class DtypeError(WeightbridgeError):
    """A dtype name or code is not one weightbridge knows."""


class SpecError(WeightbridgeError):
    """A target spec (names, shapes, dtypes) is malformed."""


class PlanError(WeightbridgeError):
    """A plan does not fit its checkpoints: stale, inconsistent, or its ops do not fit the shapes."""


Hint = tuple[str, str]


class MatchError(PlanError):
    """Source and target tensors could not be paired without guessing.

    `choices` lists what the matcher could not decide, as data: one entry per open decision,
    each a tuple of alternatives, each alternative the hints that would choose it. Running
    both models can decide between them (`weightbridge.frameworks.check`).
    """

    def __init__(self, message: str, choices: tuple[tuple[tuple[Hint, ...], ...], ...] = ()):
        super().__init__(message)
        self.choices = choices


class RuleError(PlanError):
    """An explicit rule is malformed or does not apply."""


class ConversionError(WeightbridgeError):
    """Streaming a plan into a destination failed (destination, journal, disk)."""


class VerifyError(WeightbridgeError):
    """A converted checkpoint differs from what its plan computes from the source."""
