"""Decide by execution what metadata cannot: run both models and keep the mapping that agrees.

The matcher refuses when names, shapes and order leave a decision open: the orientation of
square kernels, the flatten order after a conv stack, which of two same-shaped norms is which.
Its `MatchError` lists those decisions as data (`MatchError.choices`). When the caller can run
both implementations, each combination of alternatives is planned, the weights converted, and
the target model run on the example inputs; the one combination whose outputs equal the source
model's is kept, and the report says which decisions execution made. Nothing here imports a
framework: the caller's two functions do the running, and their outputs are read with
``numpy.asarray``.

What it does not do: search groups larger than the matcher offers (4 tied tensors), or more
than `MAX_TRIES` combinations; pick between combinations the example inputs cannot tell apart
(that is refused: use inputs that exercise every layer).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightbridge.errors import MatchError

Hint = tuple[str, str]

# At most this many hint combinations are planned and run (each costs one conversion and one
# forward pass of the target model); more open decisions than that need hints.
MAX_TRIES = 64
# A refusal may reveal another once the first is decided (orientation only shows after the
# pairing); this many rounds of refusals are followed.
MAX_ROUNDS = 3


@dataclass
class CheckReport:
    """What execution decided: the hints it added and how many combinations it ran."""

    hints: tuple[Hint, ...] = ()
    tried: int = 0
    lines: list[str] = field(default_factory=list)


def outputs_agree(got: Any, want: Any, *, rtol: float = 1e-3, atol: float = 1e-5) -> bool:
    """True if two model outputs (arrays, or tuples/lists/dicts of them) agree.

    `atol` is scaled by the largest magnitude in `want`, so the check means the same for
    logits of size 30 and activations of size 0.01; a mispaired weight changes outputs by far
    more than float rounding does on any CPU.
    """
    a, b = _leaves(got), _leaves(want)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return False
        scale = float(np.max(np.abs(y))) if y.size else 1.0
        if not np.allclose(x, y, rtol=rtol, atol=atol * max(scale, 1.0)):
            return False
    return True


def _leaves(out: Any) -> list[np.ndarray]:
    if isinstance(out, Mapping):
        return [x for k in sorted(out) for x in _leaves(out[k])]
    if isinstance(out, (list, tuple)):
        return [x for item in out for x in _leaves(item)]
    return [np.asarray(out, dtype=np.float64)]


def decide(
    adapt_once: Callable[[Sequence[Hint]], Any],
    run_mine: Callable[[Any], Any],
    reference: Any,
    hints: Sequence[Hint] = (),
) -> tuple[Any, CheckReport]:
    """Adapt with `hints`; where the matcher refuses, try its open choices and keep the one
    whose outputs equal `reference`.

    Args:
        adapt_once: plans and converts with the given hints (raises `MatchError`).
        run_mine: runs the target model on the converted weights, returns its outputs.
        reference: the source model's outputs on the same inputs.

    Raises:
        MatchError: no combination agrees, several do, or there are too many to try; and when
            the mapping made from metadata alone gives different outputs (it is then wrong,
            and the caller should know).
    """
    report = CheckReport()
    base = tuple(hints)
    try:
        result = adapt_once(base)
    except MatchError as e:
        if not e.choices:
            raise
        return _search(adapt_once, run_mine, reference, base, e, report)
    report.tried = 1
    if not outputs_agree(run_mine(result), reference):
        raise MatchError(
            "the mapping planned from names and shapes gives different outputs from the source "
            "model on the example inputs: it is wrong, or the two models do not compute the "
            "same function (check their configurations). Pair the tensors with hints or rules"
        )
    report.lines.append("execution confirmed the mapping made from metadata")
    return result, report


def _search(
    adapt_once: Callable[[Sequence[Hint]], Any],
    run_mine: Callable[[Any], Any],
    reference: Any,
    base: tuple[Hint, ...],
    first: MatchError,
    report: CheckReport,
) -> tuple[Any, CheckReport]:
    agreeing: list[tuple[tuple[Hint, ...], Any]] = []
    frontier: list[tuple[tuple[Hint, ...], MatchError]] = [((), first)]
    seen: set[tuple[Hint, ...]] = set()
    for _ in range(MAX_ROUNDS):
        following: list[tuple[tuple[Hint, ...], MatchError]] = []
        for chosen, error in frontier:
            for combo in itertools.product(*error.choices):
                extra = chosen + tuple(h for alternative in combo for h in alternative)
                if extra in seen:
                    continue
                seen.add(extra)
                if report.tried >= MAX_TRIES:
                    raise MatchError(
                        f"{first}\n\nchecking by execution stopped after {MAX_TRIES} "
                        "combinations of the open choices; give some of the hints above"
                    ) from first
                report.tried += 1
                try:
                    result = adapt_once(base + extra)
                except MatchError as again:
                    if again.choices:
                        following.append((extra, again))
                    continue
                if outputs_agree(run_mine(result), reference):
                    agreeing.append((extra, result))
        if agreeing or not following:
            break
        frontier = following
    if len(agreeing) == 1:
        extra, result = agreeing[0]
        report.hints = extra
        report.lines.append(
            f"decided by execution ({report.tried} combination(s) run): "
            + ", ".join(f"{a}={b}" for a, b in extra)
        )
        return result, report
    if not agreeing:
        raise MatchError(
            f"{first}\n\nchecking by execution: none of the {report.tried} combination(s) of "
            "the open choices gives the source model's outputs; the two models may not compute "
            "the same function (check their configurations)"
        ) from first
    options = "; ".join(", ".join(f"{a}={b}" for a, b in extra) for extra, _ in agreeing[:4])
    raise MatchError(
        f"{first}\n\nchecking by execution: {len(agreeing)} combinations give the same outputs "
        f"on the example inputs ({options}); use inputs that exercise every layer, or choose "
        "with a hint"
    ) from first
