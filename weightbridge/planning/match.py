"""The automatic matcher: pair source and target tensors from names, shapes and order alone.

`match_specs` (and `Matcher`, its callable form for `planner.make_plan`) runs the passes:
both sides become module trees (`tree`); the 2-D orientation is decided for the whole
checkpoint (`orientation`); the trees are paired by signature, ties broken only by evidence
(`pairing`, `evidence`, `order`, `hints`); each pair gets its ops from the layout rules
(`pair_ops`); and what is left is refused, with hints checked to resolve it (`refusal`).
When one-to-one pairing fails, the passes run again with fused (qkv, in_proj) and stacked
(experts) tensors split into virtual parts (`weightbridge.planning.fused`).

Ops are chosen by the parameter's role and the shape the target demands, not by rank alone.
What the matcher does not do: fuse tensors that neither side stores fused (see the rules),
or check hyperparameters other than what shapes reveal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from weightbridge.errors import Hint, MatchError
from weightbridge.plan import is_buffer
from weightbridge.planning.fused import Part, split_fused
from weightbridge.planning.hints import ORIENTATIONS, TRANSPOSE_HINT, check_hints, hint_hits
from weightbridge.planning.layouts import guess_family
from weightbridge.planning.match_result import MatchNote, MatchResult, PlannedPair, Refusal
from weightbridge.planning.names import tokens
from weightbridge.planning.order import (
    follows_order,
    is_definition_order,
    orders_agree,
)
from weightbridge.planning.orientation import decide_transpose
from weightbridge.planning.pair_ops import plan_pairs, slice_leftovers
from weightbridge.planning.pairing import Conflict, Outcome, TreeMatcher, TreePairing
from weightbridge.planning.refusal import Replan, open_choices, refusal_message
from weightbridge.planning.tree import Node, build_tree, orient_and_sign
from weightbridge.spec import TensorSpec

__all__ = ["MatchNote", "MatchResult", "Matcher", "PlannedPair", "Refusal", "match_specs"]


@dataclass(frozen=True, slots=True)
class Matcher:
    """Callable that pairs what renames left unpaired; plugs into `planner.make_plan`.

    >>> from weightbridge.spec import TensorSpec as T
    >>> found = Matcher("pytorch", "flax")([T("fc.weight", (4, 3), "F32")], [T("fc.kernel", (3, 4), "F32")])
    >>> found.pairs
    (('fc.kernel', ('fc.weight',), (Permute(axes=(1, 0)),)),)
    """

    from_framework: str | None = None
    to_framework: str | None = None
    hints: tuple[Hint, ...] = ()
    partial: bool = False
    slice_mismatched: bool = False

    def __call__(self, sources: Sequence[TensorSpec], targets: Sequence[TensorSpec]) -> MatchResult:
        return match_specs(
            sources,
            targets,
            from_framework=self.from_framework,
            to_framework=self.to_framework,
            hints=self.hints,
            partial=self.partial,
            slice_mismatched=self.slice_mismatched,
        )


def match_specs(
    sources: Sequence[TensorSpec],
    targets: Sequence[TensorSpec],
    *,
    from_framework: str | None = None,
    to_framework: str | None = None,
    hints: Sequence[Hint] = (),
    partial: bool = False,
    slice_mismatched: bool = False,
) -> MatchResult:
    """Pair target tensors with source tensors: pairs with ops, dropped source buffers, notes.

    Every pairing and op must be justified by evidence (see the module docstring); otherwise
    the result carries a `Refusal` for the whole plan, with every ambiguity listed at once and
    hints that were checked to resolve them (with `partial`, what pairs is kept and the
    refusal becomes a note). When one-to-one pairing fails, it is retried with fused (qkv,
    in_proj) and stacked (experts) tensors on either side split into virtual parts
    (`weightbridge.planning.fused`).

    The refusal names ambiguous ties (with hints that resolve them), unpaired tensors (both
    sides, with shapes), pairs no layout rule fits, conflicting evidence, or bad hints.

    Raises:
        MatchError: a hint names no tensor, or is an unknown choice.
    """
    hints = tuple(hints)
    check_hints(hints, sources, targets)
    src, dropped = [], []
    for s in sources:
        if is_buffer(s.name):
            dropped.append(s.name)
        else:
            src.append(s)
    tgt = [t for t in targets if not is_buffer(t.name)]
    fam = (
        guess_family([s.name for s in src], from_framework),
        guess_family([t.name for t in tgt], to_framework),
    )
    notes = [
        _info(
            f"source layout: {fam[0]}; target layout: {fam[1]}; "
            f"{len(src)} source and {len(tgt)} target tensors ({len(dropped)} buffers dropped)"
        )
    ]
    ctx = _Context(fam, hints, notes, slice_mismatched)
    outcome = ctx.staged(src, tgt)
    refusal = None
    if outcome.bad_hints:
        refusal = Refusal("\n".join(outcome.bad_hints))
    elif not outcome.ok:
        message = refusal_message(src, tgt, outcome, ctx.replan(src, tgt))
        if partial:
            text = "partial: left unpaired (they keep their own values):\n" + message
            notes.append(MatchNote("partial", text))
        else:
            refusal = Refusal(message, open_choices(outcome))
    return MatchResult(tuple(outcome.pairs), tuple(dropped), tuple(notes), refusal)


def _info(text: str) -> MatchNote:
    return MatchNote("info", text)


def _parent(path: str) -> str:
    """`path` up to its last separator ("" without one)."""
    cut = max(path.rfind("."), path.rfind("/"))
    return path[:cut] if cut >= 0 else ""


def _used_modules(pairs: Sequence[tuple[Node, Node]]) -> set[str]:
    """The source modules (and their ancestors) that some paired tensor comes from."""
    used: set[str] = set()
    for s, _ in pairs:
        module = _parent(s.path)
        while module and module not in used:
            used.add(module)
            module = _parent(module)
    return used


def _contest_twins(result: TreePairing, hints: tuple[Hint, ...]) -> None:
    """Turn "paired by structure, with a same-role same-shape twin left over" into a conflict.

    A module's own tensor left over while a same-named, same-shaped tensor of a module inside
    it was paired (``conv1.weight`` left, ``conv1.extra_copy.weight`` taken) is not evidence of
    a use_bias difference: the structure only preferred the subtree whose signature was exact,
    and nothing in names or order tells the two apart. Refusing the pair (with its twin as the
    other candidate) keeps `partial=True` from loading the wrong one. A pair a hint made stays.
    """
    used_modules = _used_modules(result.pairs)
    strays = [n for n in result.unpaired_sources if _parent(n.path) in used_modules]
    if not strays:
        return
    pinned = [h for h in hints if not h[0].startswith("@")]
    contested: dict[int, Conflict] = {}
    back: list[Node] = []  # sources a hint displaced, unpaired again
    taken: set[int] = set()
    for i, (s, t) in enumerate(result.pairs):
        twins = [
            n
            for n in strays
            if n.name == s.name
            and n.spec is not None
            and s.spec is not None
            and n.spec.shape == s.spec.shape
            and _inside(s.path, _parent(n.path))
        ]
        if not twins:
            continue
        candidates = [s, *twins]
        chosen = {
            id(c): c for ts, ss in pinned if hint_hits(ts, [t]) for c in hint_hits(ss, candidates)
        }
        if len(chosen) == 1:  # a hint says which: pair it, whatever the structure preferred
            (c,) = chosen.values()
            if c is not s:
                result.pairs[i] = (c, t)
                taken.add(id(c))
                back.append(s)
            continue
        contested[i] = Conflict(candidates, [t], _TWIN_WHY)
        taken.update(id(n) for n in twins)
    result.unpaired_sources = [n for n in result.unpaired_sources if id(n) not in taken] + back
    if contested:
        result.pairs = [p for i, p in enumerate(result.pairs) if i not in contested]
        result.conflicts.extend(contested.values())


def _inside(path: str, module: str) -> bool:
    """True if `path` lies inside `module` (whole name components, either separator)."""
    return path.startswith(module) and path[len(module) : len(module) + 1] in (".", "/")


_TWIN_WHY = (
    "one is a module's own tensor, the other a same-named, same-shaped tensor of a module "
    "inside it, and neither names nor order tell which the target means"
)


def _closer(a: Outcome, b: Outcome) -> bool:
    """True if pass `a` got further than `b` (its refusal is the more useful one to show)."""
    left_a = len(a.result.unpaired_targets) + len(a.result.conflicts) + len(a.stray)
    left_b = len(b.result.unpaired_targets) + len(b.result.conflicts) + len(b.stray)
    return left_a < left_b or (left_a == left_b == 0 and bool(a.problems))


@dataclass
class _Context:
    """What stays the same across the passes of one `match_specs` call."""

    fam: tuple[str, str]
    hints: tuple[Hint, ...]
    notes: list[MatchNote]
    slice_mismatched: bool
    decided: tuple[bool, str] | None = None

    def run(
        self,
        src: list[TensorSpec],
        tgt: list[TensorSpec],
        sparts: dict[str, Part],
        tparts: dict[str, Part],
        hints: tuple[Hint, ...] | None = None,
        quiet: bool = False,
    ) -> Outcome:
        """Decide the 2-D orientation, then match; try both orientations when nothing decides."""
        hints = self.hints if hints is None else hints
        notes: list[MatchNote] = [] if quiet else self.notes
        src_tree = build_tree(src, self.fam[0], self.fam[1])
        tgt_tree = build_tree(tgt, self.fam[1])
        forced = [h[1] == "yes" for h in hints if h[0] == TRANSPOSE_HINT]
        if forced:
            decided: bool | None = forced[-1]
            reason = f"the hint {TRANSPOSE_HINT}={'yes' if forced[-1] else 'no'}"
            conflict = ""
        elif self.decided is not None and (sparts or tparts):
            # Orientation belongs to the checkpoint: fused parts keep what the whole proved.
            (decided, reason), conflict = self.decided, ""
        else:
            decided, reason, conflict = decide_transpose(src_tree, tgt_tree, self.fam)
            if decided is not None:
                self.decided = (decided, reason)
        if conflict:
            return Outcome([], TreePairing(), problems=[conflict])
        order = (is_definition_order(src), is_definition_order(tgt))
        if decided is not None:
            notes.append(_info(f"2-D weights are {'' if decided else 'not '}transposed: {reason}"))
            return self._once(src_tree, tgt_tree, decided, order, hints, notes, sparts, tparts)
        tries = {
            flag: self._once(src_tree, tgt_tree, flag, order, hints, [], sparts, tparts)
            for flag in (False, True)
        }
        ok = [flag for flag, o in tries.items() if o.ok]
        if len(ok) == 1:
            notes.append(
                _info(
                    f"2-D weights are {'' if ok[0] else 'not '}transposed: only that "
                    "orientation pairs every tensor (shapes alone did not decide)"
                )
            )
            return self._once(src_tree, tgt_tree, ok[0], order, hints, notes, sparts, tparts)
        default = (self.fam[0] == "pytorch") != (self.fam[1] == "pytorch")
        if not ok:
            failed = self._once(src_tree, tgt_tree, default, order, hints, notes, sparts, tparts)
            if any(
                n.role == "matrix" and len(n.spec.shape) == 2 for n in src_tree.leaves() if n.spec
            ):
                failed.choices.append(ORIENTATIONS)
                failed.problems.append(
                    "note: nothing shows yet whether the source's 2-D weights are stored "
                    "[out, in] or [in, out]; once the rest pairs, that may need "
                    f"hints=[('{TRANSPOSE_HINT}', 'yes' or 'no')] too"
                )
            return failed
        if sorted(tries[False].pairs) == sorted(tries[True].pairs):
            # No 2-D kernel whose orientation matters: every op is the same either way.
            return self._once(src_tree, tgt_tree, default, order, hints, notes, sparts, tparts)
        if all(order) and self.fam[0] == self.fam[1]:
            agree = [flag for flag, o in tries.items() if follows_order(o.result.pairs)]
            if len(agree) == 1:
                notes.append(
                    _info(
                        f"2-D weights are {'' if agree[0] else 'not '}transposed: only that "
                        "orientation pairs kernels in both sides' definition order"
                    )
                )
                return self._once(src_tree, tgt_tree, agree[0], order, hints, notes, sparts, tparts)
        same = tries[False].mapping() == tries[True].mapping()
        problem = (
            "cannot tell whether the source stores its 2-D weights [out, in] (torch.nn.Linear) "
            "or [in, out] (GPT-2's Conv1D, Flax, Keras): "
            + (
                "every pairing is the same either way, but square weights would be transposed "
                "or not"
                if same
                else "both orientations pair every tensor, differently"
            )
            + f". Say which: hints=[('{TRANSPOSE_HINT}', 'yes')] transposes them, "
            f"hints=[('{TRANSPOSE_HINT}', 'no')] keeps them (CLI: --hint {TRANSPOSE_HINT}=yes "
            f"or --hint {TRANSPOSE_HINT}=no); both were checked to plan"
        )
        return Outcome(
            tries[default].pairs, TreePairing(), problems=[problem], choices=[ORIENTATIONS]
        )

    def staged(
        self,
        src: list[TensorSpec],
        tgt: list[TensorSpec],
        hints: tuple[Hint, ...] | None = None,
        quiet: bool = False,
    ) -> Outcome:
        """Match one-to-one; when that fails, again with fused (qkv, in_proj) and stacked
        (experts) tensors on either side split into virtual parts (`planning.fused`)."""
        outcome = self.run(src, tgt, {}, {}, hints, quiet)
        if outcome.ok:
            return outcome
        vsrc, sparts = split_fused(src, self.fam[0] == "pytorch")
        vtgt, tparts = split_fused(tgt, self.fam[1] == "pytorch")
        if sparts or tparts:
            if not quiet:
                self.notes.append(
                    _info(
                        f"one-to-one pairing failed; retrying with {len(sparts)} source and "
                        f"{len(tparts)} target fused/stacked parts split out"
                    )
                )
            retry = self.run(vsrc, vtgt, sparts, tparts, hints, quiet)
            if retry.ok or _closer(retry, outcome):
                outcome = retry
        return outcome

    def replan(self, src: list[TensorSpec], tgt: list[TensorSpec]) -> Replan:
        """Plan again, quietly, with extra hints, through the same stages as the user's call
        (to check the hints a refusal suggests)."""

        def again(extra: tuple[Hint, ...]) -> Outcome:
            hints = (*self.hints, *extra)
            try:  # a suggestion must name real tensors (not a fused tensor's virtual part)
                check_hints(hints, src, tgt)
            except MatchError as e:
                return Outcome([], TreePairing(), bad_hints=[str(e)])
            return self.staged(src, tgt, hints, quiet=True)

        return again

    def _once(
        self,
        src_tree: Node,
        tgt_tree: Node,
        transpose2d: bool,
        order: tuple[bool, bool],
        hints: tuple[Hint, ...],
        notes: list[MatchNote],
        sparts: dict[str, Part],
        tparts: dict[str, Part],
    ) -> Outcome:
        orient_and_sign(
            (src_tree, (self.fam[0], self.fam[1], transpose2d)),
            (tgt_tree, (self.fam[1], None, None)),
        )
        # Two definition orders are evidence only where they are shown to agree: Keras builds
        # a ResNet block's shortcut between its convs, torchvision defines it last. So match
        # without order first; if ties remain, order may break them only when every pair that
        # other evidence made comes in the same order on both sides.
        # The pairing it gives must keep every tensor in order on both sides too: RegNet's
        # shortcut comes first in torchvision and last in timm, next to a same-shaped conv, and
        # pairing those two by position would put one pair out of order with the rest.
        m = TreeMatcher(hints, False, False)
        m.descend(src_tree, tgt_tree)
        if m.result.conflicts and all(order) and orders_agree(m.result.pairs):
            by_order = TreeMatcher(hints, True, True)
            by_order.descend(src_tree, tgt_tree)
            if orders_agree(by_order.result.pairs):
                notes.append(
                    _info(
                        f"definition order breaks ties: all {len(by_order.result.pairs)} pairs "
                        "come in the same order on both sides"
                    )
                )
                m = by_order
        m.pair_leftovers_by_hints()
        _contest_twins(m.result, hints)
        outcome = Outcome([], m.result, bad_hints=m.bad_hints, hints_used=m.hints_used)
        plan_pairs(outcome, self.fam, transpose2d, order, hints, notes, sparts, tparts)
        if self.slice_mismatched:
            outcome.pairs += slice_leftovers(
                outcome.result,
                *self.fam,
                notes,
                (tokens(src_tree.name), tokens(tgt_tree.name)),
            )
        # A source module maps whole or not at all: a module the target lacks entirely (a
        # pooler, a classification head) is left out and reported as unused, but a lone
        # leftover tensor of a module whose other tensors were used (a bias: use_bias differs)
        # is an error; so is one whose module's submodules were used (``query.weight`` left
        # while a ``query.extra_copy.weight`` of the same shape was taken instead).
        result = outcome.result
        used_modules = _used_modules(result.pairs)
        outcome.stray = [n for n in result.unpaired_sources if _parent(n.path) in used_modules]
        if outcome.ok:
            for n in result.unpaired_sources:
                notes.append(
                    _info(f"unused: {n.path} (its whole module has no counterpart in the target)")
                )
        notes.append(
            _info(
                f"paired {len(result.pairs)} tensors by structure; {len(result.conflicts)} "
                f"ambiguous group(s), {len(result.unpaired_targets)} target(s) unpaired"
            )
        )
        return outcome
