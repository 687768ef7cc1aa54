"""The refusal: what the matcher could not pair, why, and hints checked to resolve it.

A refusal lists every ambiguity at once (both sides, with shapes), and suggests only hints
that were checked by planning again with them. It also gives the open decisions as data
(`open_choices`), which running both models can settle (`weightbridge.frameworks.check`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

from weightbridge.errors import Hint
from weightbridge.planning.evidence import index_like, similarity
from weightbridge.planning.hints import hint_text, unique_tail
from weightbridge.planning.match_result import Decision
from weightbridge.planning.names import natural_key
from weightbridge.planning.pairing import Conflict, Outcome, TreePairing
from weightbridge.planning.tree import Node, real_path, relaxed_key
from weightbridge.spec import TensorSpec

# Plans the whole match again, quietly, with these hints added to the user's.
Replan = Callable[[tuple[Hint, ...]], Outcome]

# Tied groups up to this size offer every assignment as an alternative to try by execution
# (4! = 24); larger groups need hints or rules.
_MAX_GROUP_TO_TRY = 4


def open_choices(outcome: Outcome) -> tuple[Decision, ...]:
    """The refusal's open decisions: orientation, flatten order, and each small tied group's
    possible assignments (as hints). Groups whose alternatives read the same (every layer's
    pair of norms) are one decision."""
    out = list(outcome.choices)
    for c in outcome.result.conflicts:
        if len(c.targets) > _MAX_GROUP_TO_TRY:
            continue
        alternatives: list[tuple[Hint, ...]] = []
        for pairing in _assignments(c.targets, c.sources):
            alternatives.append(_pin_hints(pairing, c))
        out.append(tuple(alternatives))
    return tuple(dict.fromkeys(out))


def refusal_message(
    src: list[TensorSpec], tgt: list[TensorSpec], outcome: Outcome, replan: Replan
) -> str:
    """The refusal message: summary, at most ~20 detail lines, then checked hints (each
    checked by planning again with it, through `replan`)."""
    r = outcome.result
    n_unpaired = len(r.unpaired_targets)
    lines = [
        f"refused to guess: {len(r.pairs)} tensor(s) paired, {len(r.conflicts)} ambiguous "
        f"group(s), {n_unpaired} target(s) and {len(r.unpaired_sources)} source(s) unmatched, "
        f"{len(outcome.problems)} other problem(s)"
    ]
    detail: list[str] = []
    fixes: list[str] = []
    for i, c in enumerate(r.conflicts):
        detail.append(f"  ambiguous ({c.why}):")
        detail += [f"    OUT {describe_leaf(leaf)}" for t in c.targets for leaf in t.leaves()][:6]
        detail += [f"    IN  {describe_leaf(leaf)}" for s in c.sources for leaf in s.leaves()][:6]
        if i < _HINTS_CHECKED:
            fixes.append(_checked_hint(c, replan))
    if r.unpaired_targets or r.unpaired_sources:
        detail.append("  no counterpart with a matching role and size:")
        detail += [f"    OUT {describe_leaf(n)} [{n.role}]" for n in r.unpaired_targets]
        detail += [f"    IN  {describe_leaf(n)} [{n.role}]" for n in r.unpaired_sources]
        bias = bias_mismatch(r)
        if bias:
            detail.append(f"  {bias}")
        fixes += _tied_copies(src, tgt, r, replan)
    if outcome.stray:
        detail.append("  left over from modules whose other tensors were used:")
        detail += [f"    IN  {describe_leaf(n)} [{n.role}]" for n in outcome.stray]
    detail += [f"  {p}" for p in outcome.problems]
    if len(detail) > _DETAIL_LINES:
        more = len(detail) - _DETAIL_LINES
        detail = [*detail[:_DETAIL_LINES], f"  ... and {more} more line(s)"]
    lines += detail
    lines.append("what to do:")
    lines += [f"  {f}" for f in _grouped(fixes)]
    lines.append(
        "  pair tensors yourself with hints (TARGET_PART=SOURCE_PART), write a rules file "
        "(--rules), or load what fits with partial=True (CLI --partial)"
    )
    return "\n".join(lines)


def _tied_copies(
    src: list[TensorSpec], tgt: list[TensorSpec], r: TreePairing, replan: Replan
) -> list[str]:
    """A target with several same-shaped unpaired sources: in a file, tied tensors (T5's
    ``shared`` and ``encoder.embed_tokens``) are stored as copies, and any of them may be
    the one. Name the hint that picks one (checked), since values are not read here."""
    out: list[str] = []
    for t in r.unpaired_targets[:_HINTS_CHECKED]:
        same = [s for s in r.unpaired_sources if relaxed_key(s) == relaxed_key(t)]
        if len(same) < 2:
            continue
        # Only a candidate whose name is strictly closest: a tie (``layer.0``/``layer.1``
        # read the same in words) leaves nothing to suggest, and order is no evidence here.
        scored = sorted(same, key=lambda s: -similarity(s, t))
        if similarity(scored[0], t) - similarity(scored[1], t) < 1e-9:
            continue
        best = scored[0]
        hint = (
            unique_tail(real_path(t), [x.name for x in tgt]),
            unique_tail(real_path(best), [x.name for x in src]),
        )
        again = replan((hint,))
        if any(u.path == t.path for u in again.result.unpaired_targets) or again.bad_hints:
            continue
        names = ", ".join(repr(real_path(s)) for s in same[:4])
        out.append(
            f"{real_path(t)!r} has {len(same)} candidates of its shape ({names}), maybe "
            f"tied copies of one tensor; to take {real_path(best)!r}: hints={[hint]!r} "
            f"(CLI: --hint {hint[0]}={hint[1]}) (checked: it pairs this tensor)"
        )
    return out


def _checked_hint(c: Conflict, replan: Replan) -> str:
    """Hints for a conflict, printed only if re-planning with them removes it. They name a
    likely pairing, for the user to confirm, not a decision, and only from evidence the
    matcher does not trust to decide on its own: word overlap, or numbers alone (Flax
    ``LayerNorm_0``/``LayerNorm_2`` and ``ln_1``/``ln_2``). Never from order: where order was
    evidence the matcher used it (two definition orders shown to agree), so a group still tied
    is one where order failed (torch's ALBERT defines ``full_layer_layer_norm`` before the
    attention, Flax's after it). With no such evidence the message says which decision is
    open instead of guessing: a suggestion followed as given must not produce a wrong model."""
    for pairing in (
        _likely_by_words(c.sources, c.targets),
        _by_numbers(c.sources, c.targets),
    ):
        if pairing is None:
            continue
        extra = _pin_hints(pairing, c)
        if not _resolves(c, replan, extra):
            continue
        pairs = ", ".join(f"{real_path(t)!r} is {real_path(s)!r}" for t, s in pairing)
        cli = " ".join(f"--hint {a}={b}" for a, b in extra)
        return f"if {pairs}: hints={list(extra)!r} (CLI: {cli}) (checked: it resolves this group)"
    return _open_decision(c, replan)


def _open_decision(c: Conflict, replan: Replan) -> str:
    """No evidence for any pairing: say which decision is open. For a small group, every way to
    decide it, each checked to resolve the group, as CLI hints for the user to choose from
    (printed so that no tool mistakes one for a suggestion); for a larger one, the form of the
    hint. Either way, running both models can settle it."""
    first = min(c.targets, key=lambda n: n.order)
    settle = "running both models settles it: adapt(..., check=(their_apply, my_apply, inputs))"
    if math.perm(len(c.sources), len(c.targets)) <= _MAX_GROUP_TO_TRY:
        options = []
        for pairing in _assignments(sorted(c.targets, key=lambda n: n.order), c.sources):
            extra = _pin_hints(pairing, c)
            if _resolves(c, replan, extra):
                options.append(" ".join(f"--hint {a}={b}" for a, b in extra))
        if options:
            listed = "  or  ".join(f"({chr(97 + i)}) {o}" for i, o in enumerate(options))
            return (
                f"nothing in names or order says which look-alike {real_path(first)!r} is; "
                f"{settle}; or choose, only you can tell which is right (each resolves it, "
                f"checked): {listed}"
            )
    sources = ", ".join(repr(hint_text(s, c.sources)) for s in c.sources[:6])
    return (
        f"nothing in names or order says which of {len(c.sources)} look-alikes "
        f"{real_path(first)!r} is: name it with --hint {hint_text(first, c.targets)}=SOURCE, "
        f"SOURCE one of {sources}, or pair the group in a rules file; {settle}"
    )


def _by_numbers(ss: list[Node], ts: list[Node]) -> list[tuple[Node, Node]] | None:
    """Tied nodes paired in the order of their numbers, when on each side the names differ only
    in their numbers and the counts are equal."""
    if len(ss) != len(ts) or not (index_like(ss) and index_like(ts)):
        return None

    def number(n: Node) -> tuple[object, ...]:
        return natural_key(n.name)

    return list(zip(sorted(ts, key=number), sorted(ss, key=number), strict=True))


def _likely_by_words(ss: list[Node], ts: list[Node]) -> list[tuple[Node, Node]] | None:
    """The assignment with the most word overlap (Jaccard), if one is strictly best: a guess
    to show in a refusal, never used to decide. Small groups only (it tries permutations)."""
    if len(ts) > 6:
        return None
    best: list[tuple[float, list[tuple[Node, Node]]]] = []
    for pairing in _assignments(ts, ss):
        best.append((sum(similarity(s, t) for t, s in pairing), pairing))
    best.sort(key=lambda x: -x[0])
    if len(best) > 1 and best[0][0] - best[1][0] < 1e-9:
        return None
    # Each target's own closest source too: a best total can pair a target with a look-alike
    # (a decoy ``layer_norm.extra_copy`` for ``final_layer_norm``) to gain elsewhere.
    for t, s in best[0][1]:
        if any(o is not s and similarity(o, t) >= similarity(s, t) for o in ss):
            return None
    return best[0][1]


def _assignments(ts: list[Node], ss: list[Node]) -> Iterator[list[tuple[Node, Node]]]:
    """Every way to give each target its own source (a group may have more sources)."""
    for perm in itertools.permutations(ss, len(ts)):
        yield list(zip(ts, perm, strict=True))


def _to_pin(pairing: list[tuple[Node, Node]], c: Conflict) -> list[tuple[Node, Node]]:
    """The pairs a hint must name: with as many sources as targets the last one follows."""
    return pairing[:-1] if len(c.sources) == len(c.targets) else pairing


def _pin_hints(pairing: list[tuple[Node, Node]], c: Conflict) -> tuple[Hint, ...]:
    """The hints that pin `pairing` of group `c` (see `_to_pin`)."""
    return tuple((hint_text(t, c.targets), hint_text(s, c.sources)) for t, s in _to_pin(pairing, c))


def _resolves(c: Conflict, replan: Replan, extra: tuple[Hint, ...]) -> bool:
    """Whether planning again with `extra` leaves group `c` no longer tied (and every hint
    names real tensors): the check behind every hint a refusal prints."""
    again = replan(extra)
    group = {t.path for t in c.targets}
    return not again.bad_hints and not any(
        {t.path for t in k.targets} == group for k in again.result.conflicts
    )


def _grouped(fixes: list[str]) -> list[str]:
    """One line per distinct hint (the same hint often resolves every layer's group)."""
    seen: dict[str, int] = {}
    first: dict[str, str] = {}
    for f in fixes:
        key = f.split(": hints=", 1)[-1]
        seen[key] = seen.get(key, 0) + 1
        first.setdefault(key, f)
    return [
        first[k] + (f" (the same hint for {n} groups)" if n > 1 else "") for k, n in seen.items()
    ]


# Refusal messages: how many groups get a re-planned, checked hint, and how many detail lines
# are shown before "... and N more" (enough to see the pattern, short enough to read).
_HINTS_CHECKED = 10
_DETAIL_LINES = 20


def describe_leaf(n: Node) -> str:
    assert n.spec is not None
    return f"{n.spec.name} {n.spec.shape}"


def bias_mismatch(result: TreePairing) -> str:
    t_bias = [n for n in result.unpaired_targets if n.role == "bias"]
    s_bias = [n for n in result.unpaired_sources if n.role == "bias"]
    if t_bias and not s_bias:
        return (
            f"the target has biases the source lacks (e.g. {t_bias[0].path}): use_bias differs "
            "between the implementations"
        )
    if s_bias and not t_bias:
        return (
            f"the source has biases the target lacks (e.g. {s_bias[0].path}): use_bias differs "
            "between the implementations"
        )
    return ""
