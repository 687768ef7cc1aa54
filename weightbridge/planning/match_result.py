"""What the automatic matcher returns: planned pairs, notes for people, and its refusal.

Typed values, so that the planner takes what it needs (the notes that belong in the plan)
by kind, and a refusal travels as data until the planner raises it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from weightbridge.errors import Hint, MatchError
from weightbridge.ops import Op

# (target name, source name(s), ops that make the target from them)
PlannedPair = tuple[str, tuple[str, ...], tuple[Op, ...]]

# An open decision (see `MatchError.choices`): its alternatives, each the hints choosing it.
Decision = tuple[tuple[Hint, ...], ...]

# What a note tells: "sliced" notes also go into the plan (a target filled with the leading
# block of a larger source); "partial" lists what partial loading left unpaired; "info" is
# everything else the matcher decided and why (layouts, orientation, order, flatten, unused).
NoteKind = Literal["info", "sliced", "partial"]


@dataclass(frozen=True, slots=True)
class MatchNote:
    """One line (or paragraph) for people about what the matcher decided."""

    kind: NoteKind
    text: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the matcher refused to pair without guessing: the message, and the open decisions
    that running both models could settle."""

    message: str
    choices: tuple[Decision, ...] = ()

    def error(self) -> MatchError:
        return MatchError(self.message, self.choices)


@dataclass(frozen=True, slots=True)
class MatchResult:
    """The matcher's answer: pairs with ops, source buffers it dropped, notes, and a refusal
    (None when every target it was given is paired, or partial loading leaves the rest)."""

    pairs: tuple[PlannedPair, ...] = ()
    dropped: tuple[str, ...] = ()
    notes: tuple[MatchNote, ...] = ()
    refusal: Refusal | None = None

    def log(self) -> list[str]:
        """The notes' text, in order (what ``plan(log=...)`` and ``adapt(verbose=True)`` show)."""
        return [n.text for n in self.notes]

    def notes_of(self, kind: NoteKind) -> list[str]:
        return [n.text for n in self.notes if n.kind == kind]
