"""Pairing two module trees: subtrees by signature, ties by evidence, leaves by role and size.

1. children with a signature found exactly once on each side are paired, wherever they are
   (reordered definitions do not matter);
2. children sharing a signature are tied; a tie is broken, in this order, by the user's hints,
   by index-like names (``layer.3`` and ``layers_3``), by a unique best name-similarity
   assignment (tokenised, with synonyms such as ``q``/``query``), and by definition order
   when both sides kept it; otherwise it is a `Conflict`, reported, never guessed;
3. what does not pair as subtrees is flattened and paired leaf by leaf, first by role and
   exact sizes, then by role and element count (``(8, 8)`` vs ``(64,)`` vs ``(1, 8, 8)``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from weightbridge.errors import Hint
from weightbridge.planning.evidence import (
    index_like,
    index_pairs,
    names_decide,
    unique_best_assignment,
)
from weightbridge.planning.hints import hint_hits
from weightbridge.planning.match_result import Decision, PlannedPair
from weightbridge.planning.tree import (
    Node,
    inner_signatures,
    leaf_count,
    loose_key,
    relaxed_key,
    relaxed_signature,
    signature,
    strict_key,
)


@dataclass
class Conflict:
    """Tied nodes the matcher refused to pair by guessing."""

    sources: list[Node]
    targets: list[Node]
    why: str = "they have the same shapes, and neither names nor order tell which is which"


@dataclass
class TreePairing:
    """What one walk of the two trees paired, refused and left over."""

    pairs: list[tuple[Node, Node]] = field(default_factory=list)  # (source leaf, target leaf)
    conflicts: list[Conflict] = field(default_factory=list)
    unpaired_sources: list[Node] = field(default_factory=list)
    unpaired_targets: list[Node] = field(default_factory=list)


class TreeMatcher:
    """Walks two module trees from the root, pairing subtrees by signature and breaking ties
    by evidence (see `tie_break`); never guesses."""

    def __init__(self, hints: Sequence[Hint], src_ordered: bool, tgt_ordered: bool) -> None:
        self.hints = list(hints)
        self.ordered = src_ordered and tgt_ordered
        self.result = TreePairing()
        self.hints_used: set[Hint] = set()
        self.bad_hints: list[str] = []

    def match(self, src: Sequence[Node], tgt: Sequence[Node], where: str) -> None:
        """Pair children by signature; where nesting differs, inline the largest unpaired
        container (``blocks`` holding ``0``, ``1`` vs. top-level ``Block_0``, ``Block_1``) and
        try again, so structure is kept as deep as possible before pairing single leaves."""
        if len(src) == 1 == len(tgt) and signature(src[0]) == signature(tgt[0]):
            self.descend(src[0], tgt[0])  # what pairing would do, in short (a common case)
            return
        left_s, left_t = self.pair_by_signature(list(src), list(tgt), where)
        while left_s and left_t:
            internal = [n for n in (*left_s, *left_t) if n.spec is None]
            if not internal:
                break
            in_t = set(map(id, left_t))
            big = max(internal, key=lambda n: (leaf_count(n), id(n) in in_t))
            side = left_t if id(big) in in_t else left_s
            side.remove(big)
            side.extend(big.children.values())
            left_s, left_t = self.pair_by_signature(left_s, left_t, where)
        if left_s or left_t:
            self.match_leaves(
                [x for n in left_s for x in n.leaves()],
                [x for n in left_t for x in n.leaves()],
                where,
            )

    def pair_by_signature(
        self, src: Sequence[Node], tgt: Sequence[Node], where: str
    ) -> tuple[list[Node], list[Node]]:
        """Pair nodes whose subtrees hold the same leaves: first by exact sizes, then (for
        what is left, e.g. [E, E] vs a DenseGeneral [E, heads, dim]) by element counts."""
        left_s, left_t = self._pair_by(signature, list(src), list(tgt), where)
        if left_s and left_t:
            left_s, left_t = self._pair_by(relaxed_signature, left_s, left_t, where)
        return left_s, left_t

    def _pair_by(
        self, sig_of: Callable[[Node], int], src: list[Node], tgt: list[Node], where: str
    ) -> tuple[list[Node], list[Node]]:
        by_sig_s: dict[object, list[Node]] = defaultdict(list)
        by_sig_t: dict[object, list[Node]] = defaultdict(list)
        for n in src:
            by_sig_s[sig_of(n)].append(n)
        for n in tgt:
            by_sig_t[sig_of(n)].append(n)
        left_s: list[Node] = []
        left_t: list[Node] = []
        # A signature that also occurs *inside* an unpaired container may have its true partner
        # in there: pairing it now could be a premature, wrong "unique" match. Such groups wait
        # until the containers are opened (see `match`).
        hidden = self._hidden(sig_of, by_sig_s, by_sig_t)
        for sig, ts in by_sig_t.items():
            ss = by_sig_s.pop(sig, [])
            if len(ss) != len(ts) or sig in hidden:
                left_s += ss
                left_t += ts
                continue
            for s, t in self.tie_break(ss, ts, where):
                self.descend(s, t)
        for ss in by_sig_s.values():
            left_s += ss
        return left_s, left_t

    @staticmethod
    def _hidden(
        sig_of: Callable[[Node], int],
        by_sig_s: dict[object, list[Node]],
        by_sig_t: dict[object, list[Node]],
    ) -> set[object]:
        """Signatures inside the nodes of groups whose sizes differ (see `_pair_by`)."""
        hidden: set[object] = set()
        for sig, ts in by_sig_t.items():
            ss = by_sig_s.get(sig, ())
            if len(ss) != len(ts):
                for n in (*ss, *ts):
                    if n.spec is None:
                        hidden |= inner_signatures(n, sig_of)
        for sig, ss in by_sig_s.items():
            if sig not in by_sig_t:  # a group with no target at all
                for n in ss:
                    if n.spec is None:
                        hidden |= inner_signatures(n, sig_of)
        return hidden

    def descend(self, s: Node, t: Node) -> None:
        s_leaf, t_leaf = s.spec is not None, t.spec is not None
        if s_leaf and t_leaf:
            self.result.pairs.append((s, t))
        elif s_leaf or t_leaf:
            self.match_leaves(s.leaves(), t.leaves(), t.path)
        else:
            self.match(list(s.children.values()), list(t.children.values()), t.path)

    def pair_leftovers_by_hints(self) -> None:
        """Hints also pair what is left over once the trees are matched, whose groups differ in
        size (three tied copies of an embedding in a file against one table): the hinted one
        is taken, the rest stay unpaired."""
        r = self.result
        for hint in self.hints:
            if hint[0].startswith("@"):
                continue
            t_hit = hint_hits(hint[0], r.unpaired_targets)
            s_hit = [
                s
                for s in hint_hits(hint[1], r.unpaired_sources)
                if t_hit and relaxed_key(s) == relaxed_key(t_hit[0])
            ]
            if len(t_hit) == 1 and len(s_hit) == 1:
                self.hints_used.add(hint)
                r.pairs.append((s_hit[0], t_hit[0]))
                r.unpaired_sources.remove(s_hit[0])
                r.unpaired_targets.remove(t_hit[0])

    def match_leaves(self, src: list[Node], tgt: list[Node], where: str) -> None:
        for key in (strict_key, relaxed_key, loose_key):
            groups_s: dict[object, list[Node]] = defaultdict(list)
            groups_t: dict[object, list[Node]] = defaultdict(list)
            for n in src:
                groups_s[key(n)].append(n)
            for n in tgt:
                groups_t[key(n)].append(n)
            src, tgt = [], []
            for k, ts in groups_t.items():
                ss = groups_s.pop(k, [])
                if len(ss) == len(ts):
                    for s, t in self.tie_break(
                        sorted(ss, key=lambda n: n.order), sorted(ts, key=lambda n: n.order), where
                    ):
                        self.result.pairs.append((s, t))
                else:
                    src += ss
                    tgt += ts
            for ss in groups_s.values():
                src += ss
        self.result.unpaired_sources += src
        self.result.unpaired_targets += tgt

    def tie_break(self, ss: list[Node], ts: list[Node], where: str) -> list[tuple[Node, Node]]:
        """Pair tied nodes (same signature) by evidence, or record a conflict.

        Evidence, strongest first: the user's hints; index-like names (``layer.3`` and
        ``layers_3``); a name-similarity assignment in which every pair is strictly the best
        for both of its nodes; definition order when both sides kept it. Names and order must
        not contradict each other: when they point to different assignments, it is a conflict.
        """
        if len(ss) == 1:
            return [(ss[0], ts[0])]
        pairs: list[tuple[Node, Node]] = []
        ss, ts = list(ss), list(ts)
        for hint in self.hints:
            t_hit = hint_hits(hint[0], ts)
            s_hit = hint_hits(hint[1], ss)
            if t_hit or s_hit:
                self.hints_used.add(hint)
            if len(t_hit) == len(ts) and len(s_hit) == len(ss):
                continue  # names a parent of this whole group: a hint for another level
            if len(t_hit) == 1 and len(s_hit) == 1:
                pairs.append((s_hit[0], t_hit[0]))
                ss.remove(s_hit[0])
                ts.remove(t_hit[0])
            elif len(t_hit) > 1 or len(s_hit) > 1:
                self.bad_hints.append(
                    f"hint {hint[0]}={hint[1]} matches more than one tensor or module among "
                    f"tied candidates: targets {[t.path for t in t_hit][:4]}, sources "
                    f"{[s.path for s in s_hit][:4]}; make it longer (a full path works)"
                )
        if len(ss) <= 1:
            return pairs + list(zip(ss, ts, strict=True))
        for use_path in (False, True):  # layer.3 ~ layers_3; then layer.3.mlp ~ layers_3/mlp
            if index_like(ss, use_path=use_path) and index_like(ts, use_path=use_path):
                by_index = index_pairs(ss, ts, use_path)
                if by_index is not None:
                    return pairs + by_index
                self.result.conflicts.append(
                    Conflict(ss, ts, "their numbers do not line up (one side skips some)")
                )
                return pairs + self.provisional(ss, ts)
        by_names = unique_best_assignment(ss, ts)
        by_order = (
            list(
                zip(
                    sorted(ss, key=lambda n: n.order),
                    sorted(ts, key=lambda n: n.order),
                    strict=True,
                )
            )
            if self.ordered
            else None
        )
        if by_names is not None and by_order is not None:
            same = {(id(a), id(b)) for a, b in by_names} == {(id(a), id(b)) for a, b in by_order}
            if same or names_decide(by_names, ss, ts):
                return pairs + by_names
            self.result.conflicts.append(
                Conflict(ss, ts, "names and definition order point to different pairings")
            )
            return pairs + self.provisional(ss, ts)
        chosen = by_names if by_names is not None else by_order
        if chosen is not None:
            return pairs + chosen
        self.result.conflicts.append(Conflict(ss, ts))
        return pairs + self.provisional(ss, ts)

    def provisional(self, ss: list[Node], ts: list[Node]) -> list[tuple[Node, Node]]:
        """Descend into a refused group anyway, so that conflicts nested inside it are reported
        in the same round (the tied subtrees have the same structure, so theirs are real)."""
        for s, t in zip(ss, ts, strict=True):
            if not s.is_leaf and not t.is_leaf:
                inner = TreeMatcher(self.hints, self.ordered, self.ordered)
                inner.match(list(s.children.values()), list(t.children.values()), t.path)
                self.result.conflicts += inner.result.conflicts
                self.hints_used |= inner.hints_used
                self.bad_hints += inner.bad_hints
        return []


@dataclass
class Outcome:
    """One matching pass: the planned pairs, or why it failed (typed, for re-checking hints)."""

    pairs: list[PlannedPair]
    result: TreePairing
    problems: list[str] = field(default_factory=list)
    stray: list[Node] = field(default_factory=list)
    bad_hints: list[str] = field(default_factory=list)
    hints_used: set[Hint] = field(default_factory=set)
    # Open decisions, as data (see `MatchError.choices`).
    choices: list[Decision] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        r = self.result
        return not (r.conflicts or r.unpaired_targets or self.stray or self.problems)

    def mapping(self) -> dict[str, tuple[str, ...]]:
        return {t: s for t, s, _ in self.pairs}
