"""Make a plan from specs: explicit renames, framework layouts, then pairing with the target.

Pure functions of specs; no file is opened here. The order is: the user's rename rules
(regexes with back-references, applied in order like the hand-written ``re.sub`` chains they
replace), then the framework layout change of each parameter (axis order and leaf names), then
pairing with the target spec by name. Whatever is still unpaired is handed to a `matcher`
callable when one is given (the automatic matcher plugs in there); otherwise it is an error
that lists both sides.
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from weightbridge import dtypes
from weightbridge.errors import PlanError, RuleError
from weightbridge.ops import Cast, Op, Reshape, infer
from weightbridge.plan import Note, Plan, Step, is_buffer
from weightbridge.planning import dequantize as fp8
from weightbridge.planning.layout_flags import convert_params
from weightbridge.planning.match_result import MatchResult, PlannedPair
from weightbridge.planning.rules import resolve as resolve_rules
from weightbridge.spec import CheckpointSpec, TensorSpec

# Steps whose source names start with this read the *target* checkpoint: the target's own
# values, for tensors partial loading or a use_fallback rule leaves as they are.
MINE = "mine:"

_FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True, slots=True)
class Rename:
    """Rename source tensors whose name matches `pattern` (``re.sub`` semantics, ``\\1`` works).

    An empty result drops the tensor (it is reported as unused, "dropped by rule").
    """

    pattern: str
    replacement: str

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise RuleError(
                f"rename rule {self.pattern!r}: not a valid regular expression ({e})"
            ) from e

    def apply(self, name: str) -> str:
        try:
            return re.sub(self.pattern, self.replacement, name)
        except (re.error, IndexError) as e:
            raise RuleError(
                f"rename rule {self.pattern!r} -> {self.replacement!r} failed on {name!r} ({e}); "
                "check the group numbers in the replacement"
            ) from e

    @classmethod
    def parse(cls, text: str) -> Rename:
        """Parse ``PATTERN=REPLACEMENT`` (the CLI's ``--rename``)."""
        if "=" not in text:
            raise RuleError(
                f"rename {text!r} must look like PATTERN=REPLACEMENT, e.g. '^module\\.='"
            )
        pattern, replacement = text.split("=", 1)
        return cls(pattern, replacement)


# A matcher pairs what names alone could not: (unpaired source specs, unpaired target specs)
# -> a `MatchResult` (pairs, notes, refusal), or, from a simple custom matcher, bare pairs
# (target name, source name(s), ops).
Matcher = Callable[
    [Sequence[TensorSpec], Sequence[TensorSpec]], MatchResult | Sequence[PlannedPair]
]


def make_plan(
    source: CheckpointSpec,
    target: CheckpointSpec | None = None,
    *,
    renames: Sequence[Rename] = (),
    from_framework: str | None = None,
    to_framework: str | None = None,
    dtype: str | None = None,
    matcher: Matcher | None = None,
    rules: Mapping[str, Any] | None = None,
    partial: bool = False,
    log: list[str] | None = None,
    dequantize: bool = False,
) -> Plan:
    """Plan a conversion of `source` into `target` (or into what the renames produce).

    Args:
        source: specs of the checkpoint to read ("theirs").
        target: specs to produce ("mine"); None means "whatever the rules and layouts give".
        renames: rename rules, applied in order to every source name.
        from_framework, to_framework: layout conventions (``pytorch``, ``flax``, ``keras``...).
        dtype: cast floating-point tensors to this dtype.
        matcher: pairs tensors left unpaired by name (see `weightbridge.planning.match`).
        rules: ``{target_regex: Transform}`` applied before anything else (see `weightbridge.planning.rules`).
        partial: load what fits; targets nothing pairs keep their own value (a step whose
            source is ``mine:<name>``, read from the target checkpoint) instead of an error.
        log: the matcher's notes for people (what it decided, and why) are appended here.
        dequantize: make each block-scaled FP8 weight (``X.weight`` with ``X.weight_scale_inv``)
            a float tensor (`dtype`, bf16 by default), dropping the scales; without it, a plan
            that casts such a weight is refused (see `weightbridge.planning.dequantize`).

    Raises:
        PlanError: unpaired tensors (both sides listed, with shapes) or ops that do not fit;
            `rules` without a target.
        MatchError: the matcher refused to pair without guessing.

    >>> src = CheckpointSpec.of([TensorSpec("fc.weight", (4, 3), "F32")])
    >>> print(make_plan(src, from_framework="pytorch", to_framework="flax").explain())
    target     shape  dtype  source     ops
    ---------  -----  -----  ---------  ---
    fc.kernel  3x4    F32    fc.weight  permute(1,0)
    """
    if rules and target is None:
        first = next(iter(rules))
        raise PlanError(
            f"{len(rules)} rule(s) (e.g. target {first!r}) were given without a target, and "
            "rules pick each target tensor's source: pass the target (target=, --like "
            "model.safetensors or a spec JSON), or use renames for a conversion without one; a "
            "rules file with source_ops makes its own target (rules_file=NAME, --rules NAME)"
        )
    with _gc_paused():
        pairs = fp8.scaled_weights(source)
        others = fp8.other_scaled(source, pairs)
        if dequantize:
            fp8.check_scaled(source, pairs, others)
        if dequantize and pairs:
            view = fp8.dequantized_view(
                source, pairs, dtypes.canonical(dtype) if dtype else fp8.DEFAULT_DTYPE
            )
        else:
            if target is not None:
                fp8.refuse_float_target(target, pairs)
            view = source
        plan = _make_plan(
            view,
            target,
            renames,
            from_framework,
            to_framework,
            dtype,
            matcher,
            rules,
            partial,
            log,
        )
        if dequantize and pairs:
            keeps = any(s.startswith(MINE) for step in plan.steps for s in step.sources)
            reads = _with_mine(source, target) if keeps and target is not None else source
            plan = fp8.with_dequantize(plan, reads, pairs)
        elif dequantize:
            plan = replace(plan, notes=(*plan.notes, fp8.no_scaled_note()))
        fp8.refuse_scaled_casts(plan, source, {} if dequantize else pairs, others)
        return plan


def _with_mine(source: CheckpointSpec, target: CheckpointSpec) -> CheckpointSpec:
    """What a plan that keeps some of the target's own values reads: `source`, and the whole
    target as ``mine:<name>`` (see api.convert's UnionReader)."""
    return CheckpointSpec.of(
        [*source, *(TensorSpec(MINE + t.name, t.shape, t.dtype) for t in target)]
    )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while planning.

    Planning allocates hundreds of thousands of small container objects that live until it
    ends (tree nodes, dicts, tuples), and the collector would scan them again and again: a
    third of the time at 20,000 tensors. They hold no reference cycles, so reference counting
    frees them; the collector's previous state is restored afterwards. (The switch is
    process-wide: other threads' collections wait too, for as long as a plan takes.)
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_plan(
    source: CheckpointSpec,
    target: CheckpointSpec | None,
    renames: Sequence[Rename],
    from_framework: str | None,
    to_framework: str | None,
    dtype: str | None,
    matcher: Matcher | None,
    rules: Mapping[str, Any] | None,
    partial: bool,
    log: list[str] | None,
) -> Plan:
    cast_to = dtypes.canonical(dtype) if dtype else None
    unused: dict[str, str] = {}
    renamed: list[tuple[TensorSpec, str]] = []
    for t in source:
        name = t.name
        for rule in renames:
            name = rule.apply(name)
        if not name:
            unused[t.name] = "dropped by rule"
            continue
        renamed.append((t, name))
    layout = convert_params(
        [(name, t.shape) for t, name in renamed],
        from_framework,
        to_framework,
        None if target is None else {t.name: t.shape for t in target},
        strict=target is None,
    )
    # name -> (source spec, ops, whether the layout flags decided this tensor's role)
    candidates: dict[str, tuple[TensorSpec, tuple[Op, ...], bool]] = {}
    for (t, _), change in zip(renamed, layout.changes, strict=True):
        name = change.name
        if name in candidates:
            other = candidates[name][0].name
            raise PlanError(
                f"source tensors {other!r} and {t.name!r} both become {name!r}; "
                "fix the rename rules so each target name comes from one source"
            )
        candidates[name] = (t, change.ops, change.problem is None)

    steps: list[Step] = []
    if target is None:
        for name, (t, ops, _) in candidates.items():
            shape, dt = infer(ops, [t.shape], t.dtype, where=f"tensor {t.name!r}")
            ops, dt = _with_cast(ops, dt, cast_to)
            steps.append(Step(TensorSpec(name, shape, dt), (t.name,), ops))
        return Plan.build(source, steps, unused=unused, notes=_layout_notes(layout.notes))

    paired: dict[str, tuple[tuple[str, ...], tuple[Op, ...]]] = {}
    kept_by_rule: list[str] = []
    if rules:
        outcome = resolve_rules(rules, source, target)
        paired.update(outcome.steps)
        kept_by_rule = outcome.fallback
    taken = {s for snames, _ in paired.values() for s in snames}
    for name, (t, ops, decided) in candidates.items():
        if (
            # With a matcher, even equal names pair through it: the ops of a 2-D weight depend
            # on how the whole checkpoint stores them (a GPT-2 Conv1D under nn.Linear names).
            matcher is None
            and name in target
            and name not in paired
            and name not in kept_by_rule
            and t.name not in taken
            # A tensor whose layout the flags could not decide pairs by name only as it is;
            # otherwise the matcher decides.
            and (decided or target[name].shape == t.shape)
        ):
            paired[name] = ((t.name,), _fit(ops, t, target[name]))
    taken = {s for snames, _ in paired.values() for s in snames}
    left_src = [t for name, (t, _, _) in candidates.items() if t.name not in taken]
    left_tgt = [t for t in target if t.name not in paired and t.name not in kept_by_rule]
    sliced: list[str] = []
    if (left_src or left_tgt) and matcher is not None:
        # The matcher sees the renamed names; its pairs are mapped back to the source's.
        original = {name: t.name for name, (t, _, _) in candidates.items() if t.name not in taken}
        as_renamed = [source[o].renamed(name) for name, o in original.items()]
        found = matcher(as_renamed, left_tgt)
        pairs: Sequence[PlannedPair]
        if isinstance(found, MatchResult):
            if log is not None:
                log += found.log()
            if found.refusal is not None:
                raise found.refusal.error()
            sliced = found.notes_of("sliced")
            pairs = found.pairs
        else:
            pairs = found
        for tname, snames, ops in pairs:
            paired[tname] = (tuple([original[s] for s in snames]), ops)
        used = {s for snames, _ in paired.values() for s in snames}
        left_src = [t for t in left_src if t.name not in used]
        left_tgt = [t for t in target if t.name not in paired]
    kept = [t for t in left_tgt if is_buffer(t.name)]
    left_tgt = [t for t in left_tgt if not is_buffer(t.name)]
    if left_tgt and not partial:
        raise PlanError(_unpaired_message(left_src, left_tgt))
    for t in left_src:
        unused[t.name] = (
            "buffer, not carried over" if is_buffer(t.name) else "no counterpart in the target"
        )
    notes = _layout_notes(layout.notes)
    notes += [
        Note("buffer", f"target buffer {t.name} has no source; it keeps its own value")
        for t in kept
    ]
    notes += [Note("sliced", text) for text in sliced]
    own = [*kept_by_rule, *(t.name for t in left_tgt)]
    for name in kept_by_rule:
        notes.append(Note("kept", f"kept: {name} keeps the target's own value (rule use_fallback)"))
    for t in left_tgt:
        notes.append(
            Note(
                "kept",
                f"kept: {t.name} {t.shape} has no counterpart; it keeps the target's own value",
            )
        )
    union = source
    if own:
        # The whole target is readable as mine:<name> (see api.convert's UnionReader), so the
        # plan's source fingerprint covers all of it.
        union = _with_mine(source, target)
        for name in own:
            paired[name] = ((MINE + name,), ())
    source = union
    for t in target:
        if t.name not in paired:
            continue
        snames, ops = paired[t.name]
        srcs = [source[s] for s in snames]
        shape, dt = infer(ops, [s.shape for s in srcs], srcs[0].dtype, where=f"target {t.name!r}")
        if dt != t.dtype:
            ops = (*ops, Cast(t.dtype))
        final = (
            t if cast_to is None or t.dtype not in _FLOATS else TensorSpec(t.name, t.shape, cast_to)
        )
        ops, _ = _with_cast(ops, t.dtype, cast_to)
        steps.append(Step(final, snames, ops))
    return Plan.build(source, steps, unused=unused, notes=notes)


def _fit(ops: tuple[Op, ...], src: TensorSpec, tgt: TensorSpec) -> tuple[Op, ...]:
    """Append a reshape when the shapes hold the same elements in a different shape."""
    shape, _ = infer(ops, [src.shape], src.dtype, where=f"tensor {src.name!r}")
    if shape == tgt.shape:
        return ops
    if math.prod(shape) == math.prod(tgt.shape):
        if _splits_or_merges(shape, tgt.shape):
            return (*ops, Reshape(tgt.shape))
        raise PlanError(
            f"source {src.name!r} {src.shape} becomes {shape} but target {tgt.name!r} is "
            f"{tgt.shape}: the same elements grouped along other axes, which a reshape would "
            "scramble; check the rename rules and --from/--to, or leave the pair to --like's "
            "matcher (rename it to a name the target does not have)"
        )
    raise PlanError(
        f"source {src.name!r} {src.shape} becomes {shape} but target {tgt.name!r} is {tgt.shape}: "
        "they do not hold the same number of elements; check the rename rules, or use partial "
        "loading to keep the target's own value"
    )


def _splits_or_merges(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True when one shape only splits or merges axes of the other (size-1 axes aside).

    ``(1, 1, 1, 8)`` -> ``(8,)`` and ``(4, 8)`` -> ``(4, 2, 4)`` keep every element's place in
    the grouping; ``(4, 8)`` -> ``(8, 4)`` does not (it is a transpose's shape, not a reshape's).

    >>> _splits_or_merges((4, 8), (4, 2, 4)), _splits_or_merges((4, 8), (8, 4))
    (True, False)
    """

    def cuts(shape: tuple[int, ...]) -> set[int]:
        out, n = set(), 1
        for d in shape:
            n *= d
            out.add(n)
        return out

    x, y = cuts(a), cuts(b)
    return x <= y or y <= x


def _with_cast(ops: tuple[Op, ...], dtype: str, cast_to: str | None) -> tuple[tuple[Op, ...], str]:
    if cast_to is None or dtype not in _FLOATS or dtype == cast_to:
        return ops, dtype
    ops = tuple(op for op in ops if not isinstance(op, Cast))
    return (*ops, Cast(cast_to)), cast_to


def _unpaired_message(left_src: Sequence[TensorSpec], left_tgt: Sequence[TensorSpec]) -> str:
    lines = [f"failed to pair {len(left_tgt)} target tensor(s) with a source tensor:"]
    lines += [f"  OUT {t.name} {t.shape} {t.dtype}" for t in left_tgt[:30]]
    if len(left_tgt) > 30:
        lines.append(f"  ... and {len(left_tgt) - 30} more")
    lines += [f"  IN  {t.name} {t.shape} {t.dtype}" for t in left_src[:30]]
    if len(left_src) > 30:
        lines.append(f"  ... and {len(left_src) - 30} more")
    lines.append(
        "add rename rules (--rename 'PATTERN=REPLACEMENT') that turn the IN names into the OUT "
        "names, or choose the frameworks with --from/--to"
    )
    return "\n".join(lines)


def _layout_notes(texts: Sequence[str]) -> list[Note]:
    """The layout flags' notes (what was inferred from the names), typed for the plan."""
    return [Note("layout", text) for text in texts]
