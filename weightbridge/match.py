"""The automatic matcher: pair source and target tensors from names, shapes and order alone.

Both sides are turned into trees of modules (name components split on ``.`` and ``/``; Flax
collections, Haiku ``~`` and Keras ``:0`` removed; single-child chains such as ``module.`` or
``backbone.0.body.`` collapsed). Every leaf gets a *role* (matrix, scale, bias, mean, var,
param) and every subtree a *signature*: the multiset of its leaves' roles and sizes, which does
not change with axis order or framework. Matching then walks both trees from the root:

1. children with a signature found exactly once on each side are paired, wherever they are
   (reordered definitions do not matter);
2. children sharing a signature are tied; a tie is broken, in this order, by the user's hints,
   by index-like names (``layer.3`` and ``layers_3``), by a unique best name-similarity
   assignment (tokenised, with synonyms such as ``q``/``query``), and by definition order
   when both sides kept it; otherwise it is *ambiguous* and reported, never guessed;
3. what does not pair as subtrees is flattened and paired leaf by leaf, first by role and
   exact sizes, then by role and element count (``(8, 8)`` vs ``(64,)`` vs ``(1, 8, 8)``).

Each pair then gets its ops from `weightbridge.layouts`: chosen by the parameter's role and
the shape the target demands, not by rank alone. What the matcher does not do: split or fuse
tensors (see the rules), or check hyperparameters other than what shapes reveal.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from weightbridge.errors import MatchError
from weightbridge.fused import Part, join_ops, source_part_ops, split_fused
from weightbridge.layouts import (
    fit_ops,
    guess_family,
    is_buffer,
    is_embedding,
    layout_permutation,
    leaf_role,
)
from weightbridge.ops import Op
from weightbridge.spec import TensorSpec

Hint = tuple[str, str]  # (substring of a target name, substring of a source name)


_SYNONYMS = {
    "query": "q",
    "key": "k",
    "value": "v",
    "output": "o",
    "out": "o",
    "dense": "fc",
    "linear": "fc",
    "lin": "fc",
    "layernorm": "norm",
    "ln": "norm",
    "batchnorm": "norm",
    "bn": "norm",
    "groupnorm": "norm",
    "attention": "attn",
    "selfattention": "attn",
    "self": "attn",
    "ffn": "mlp",
    "feedforward": "mlp",
    "intermediate": "mlp",
    "embeddings": "embed",
    "embedding": "embed",
    "emb": "embed",
    "convolution": "conv",
    "layers": "layer",
    "blocks": "block",
    "stages": "stage",
}


def tokens(name: str) -> frozenset[str]:
    """Normalised word tokens of a name (digits dropped, synonyms folded).

    >>> sorted(tokens("encoder.layer.0.attention.self.query"))
    ['attn', 'encoder', 'layer', 'q']
    """
    name = re.sub(r"([a-z])([A-Z])", r"\1_\2", name.replace(":0", ""))
    words = [w for w in re.split(r"[^a-zA-Z]+", name.lower()) if w]
    return frozenset(_SYNONYMS.get(w, w) for w in words)


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``layer_2`` before ``layer_10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


@dataclass
class Node:
    """A module (or a leaf tensor) in one side's name tree."""

    name: str  # this node's own name component(s)
    path: str  # full path, for messages and hints
    order: int  # position of its first tensor in that side's checkpoint order
    children: dict[str, Node] = field(default_factory=dict)
    spec: TensorSpec | None = None  # set on leaves
    role: str = ""
    key: tuple[int, ...] = ()  # oriented shape, see _oriented
    counts: dict[str, Counter[object]] = field(default_factory=dict, repr=False)
    sig: frozenset[tuple[object, int]] | None = field(default=None, repr=False)
    rsig: frozenset[tuple[object, int]] | None = field(default=None, repr=False)
    inner: dict[str, set[object] | None] | None = field(default=None, repr=False)

    @property
    def is_leaf(self) -> bool:
        return self.spec is not None

    def leaves(self) -> list[Node]:
        if self.is_leaf:
            return [self]
        out: list[Node] = []
        for child in self.children.values():
            out.extend(child.leaves())
        return out


def _components(name: str) -> list[str]:
    parts = [p.replace(":0", "") for p in re.split(r"[./]", name) if p and p != "~"]
    if parts and parts[0] in ("params", "batch_stats", "model_weights"):
        parts = parts[1:]
    out: list[str] = []
    for p in parts:
        # Keras h5 repeats the layer name (dense/dense/kernel); "conv.0.0" is two real levels.
        if not out or out[-1] != p or p.isdigit():
            out.append(p)
    return out or [name]


def build_tree(specs: Sequence[TensorSpec], family: str, into: str | None = None) -> Node:
    """The module tree of one side; `into` (the other side's layout) orients source kernels."""
    root = Node("", "", 0)
    for i, spec in enumerate(specs):
        parts = _components(spec.name)
        node = root
        for depth, part in enumerate(parts[:-1]):
            if part not in node.children or node.children[part].is_leaf:
                key = part if part not in node.children else part + "/"
                node.children[key] = Node(part, "/".join(parts[: depth + 1]), i)
                part = key
            node = node.children[part]
        leaf = parts[-1]
        while leaf in node.children:
            leaf += "'"
        node.children[leaf] = Node(leaf, spec.name, i, spec=spec)
    for node in _all_internal(root):
        siblings = {c.name: c.spec for c in node.children.values() if c.is_leaf}
        for child in node.children.values():
            if child.spec is not None:
                child.role = leaf_role(child.name, child.spec.shape, siblings, family, child.path)
                child.key = _oriented(child, family, into)
    _collapse(root)
    return root


def _all_internal(node: Node) -> list[Node]:
    out = [node]
    for c in node.children.values():
        if not c.is_leaf:
            out.extend(_all_internal(c))
    return out


def _collapse(node: Node) -> None:
    """Merge chains of single-child modules (``module.``, ``backbone.0.body.``) into one node."""
    while len(node.children) == 1:
        (only,) = node.children.values()
        if only.is_leaf:
            break
        node.children = only.children
        node.name = f"{node.name}.{only.name}" if node.name else only.name
        node.path = only.path
    for c in node.children.values():
        if not c.is_leaf:
            _collapse(c)


def _oriented(leaf: Node, family: str, into: str | None) -> tuple[int, ...]:
    """A leaf's shape as the other side would hold it (kernels permuted to its layout), with
    size-1 axes dropped: [32, 8] torch up_proj and [8, 32] Flax wi agree, and so up and down
    projections of the same size are told apart by orientation."""
    assert leaf.spec is not None
    shape = leaf.spec.shape
    if into is not None and leaf.role == "matrix" and not is_embedding(leaf.path):
        for op in layout_permutation(len(shape), family, into):
            shape = op.out_shape([shape])
    return tuple(d for d in shape if d != 1)


def _strict(leaf: Node) -> tuple[str, tuple[int, ...]]:
    return leaf.role, leaf.key


def _loose(leaf: Node) -> tuple[str, int]:
    """Last resort: weights of any rank pair by size alone (``pos_embed`` [1, N, D] as a bare
    parameter vs. a position table [N, D]; a flattened (64,) ``w`` vs. an (8, 8) kernel).
    Ties still need names, order or hints, as everywhere."""
    assert leaf.spec is not None
    loose = leaf.role in ("param", "matrix", "scale")
    return ("weight" if loose else leaf.role), leaf.spec.numel


def _relaxed(leaf: Node) -> tuple[str, int]:
    assert leaf.spec is not None
    return leaf.role, leaf.spec.numel


def _counts(node: Node, key: Any) -> Counter[object]:
    """Counter of `key` over a subtree's leaves, built bottom-up from the children's (cached)."""
    cache = node.counts.get(key.__name__)
    if cache is None:
        if node.is_leaf:
            cache = Counter([key(node)])
        else:
            cache = Counter()
            for c in node.children.values():
                cache.update(_counts(c, key))
        node.counts[key.__name__] = cache
    return cache


def signature(node: Node) -> frozenset[tuple[object, int]]:
    """Multiset of (role, oriented shape) over a subtree's leaves; cached on the node."""
    if node.sig is None:
        node.sig = frozenset(_counts(node, _strict).items())
    return node.sig


def relaxed_signature(node: Node) -> frozenset[tuple[object, int]]:
    """Multiset of (role, element count) over a subtree's leaves; cached on the node."""
    if node.rsig is None:
        node.rsig = frozenset(_counts(node, _relaxed).items())
    return node.rsig


def _inner_signatures(node: Node, sig_of: Any = None) -> set[object]:
    """Signatures of every subtree strictly inside `node` (cached per signature kind)."""
    sig_of = sig_of or signature
    if node.is_leaf:
        return set()
    cache = node.inner.setdefault(sig_of.__name__, None) if node.inner is not None else None
    if cache is None:
        inner: set[object] = set()
        for c in node.children.values():
            inner.add(sig_of(c))
            inner |= _inner_signatures(c, sig_of)
        if node.inner is None:
            node.inner = {}
        node.inner[sig_of.__name__] = inner
        cache = inner
    return cache


def _leaf_count(node: Node) -> int:
    return sum(_counts(node, _strict).values())


@dataclass
class Conflict:
    """Tied nodes the matcher refused to pair by guessing."""

    sources: list[Node]
    targets: list[Node]


@dataclass
class MatchResult:
    pairs: list[tuple[Node, Node]] = field(default_factory=list)  # (source leaf, target leaf)
    conflicts: list[Conflict] = field(default_factory=list)
    unpaired_sources: list[Node] = field(default_factory=list)
    unpaired_targets: list[Node] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


class _Matcher:
    def __init__(self, hints: Sequence[Hint], src_ordered: bool, tgt_ordered: bool) -> None:
        self.hints = list(hints)
        self.ordered = src_ordered and tgt_ordered
        self.result = MatchResult()

    def match(self, src: Sequence[Node], tgt: Sequence[Node], where: str) -> None:
        """Pair children by signature; where nesting differs, inline the largest unpaired
        container (``blocks`` holding ``0``, ``1`` vs. top-level ``Block_0``, ``Block_1``) and
        try again, so structure is kept as deep as possible before pairing single leaves."""
        left_s, left_t = self.pair_by_signature(list(src), list(tgt), where)
        while left_s and left_t:
            internal = [n for n in (*left_s, *left_t) if not n.is_leaf]
            if not internal:
                break
            big = max(internal, key=lambda n: (_leaf_count(n), n in left_t))
            side = left_s if big in left_s else left_t
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
        self, sig_of: Any, src: list[Node], tgt: list[Node], where: str
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
        hidden: set[object] = set()
        for sig in set(by_sig_s) | set(by_sig_t):
            ss, ts = by_sig_s.get(sig, []), by_sig_t.get(sig, [])
            if len(ss) != len(ts):
                for n in (*ss, *ts):
                    hidden |= _inner_signatures(n, sig_of)
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

    def descend(self, s: Node, t: Node) -> None:
        if s.is_leaf and t.is_leaf:
            self.result.pairs.append((s, t))
        elif s.is_leaf or t.is_leaf:
            self.match_leaves(s.leaves(), t.leaves(), t.path)
        else:
            self.match(list(s.children.values()), list(t.children.values()), t.path)

    def match_leaves(self, src: list[Node], tgt: list[Node], where: str) -> None:
        for key in (_strict, _relaxed, _loose):
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
        if len(ss) == 1:
            return [(ss[0], ts[0])]
        pairs: list[tuple[Node, Node]] = []
        ss, ts = list(ss), list(ts)
        for t_sub, s_sub in self.hints:
            t_hit = [t for t in ts if t_sub in t.path]
            s_hit = [s for s in ss if s_sub in s.path]
            if len(t_hit) == 1 and len(s_hit) == 1:
                pairs.append((s_hit[0], t_hit[0]))
                ss.remove(s_hit[0])
                ts.remove(t_hit[0])
        if len(ss) <= 1:
            return pairs + list(zip(ss, ts, strict=True))
        if _index_like(ss) and _index_like(ts):
            return pairs + list(
                zip(
                    sorted(ss, key=lambda n: natural_key(n.name)),
                    sorted(ts, key=lambda n: natural_key(n.name)),
                    strict=True,
                )
            )
        if _index_like(ss, use_path=True) and _index_like(ts, use_path=True):
            # Same-named modules in numbered parents (layer.3.intermediate vs layers_3/wi).
            return pairs + list(
                zip(
                    sorted(ss, key=lambda n: natural_key(n.path)),
                    sorted(ts, key=lambda n: natural_key(n.path)),
                    strict=True,
                )
            )
        best = _unique_best_assignment(ss, ts)
        if best is not None:
            return pairs + best
        if self.ordered or (_index_like(ss) and self.ordered_tgt_names(ts)):
            return pairs + list(
                zip(
                    sorted(ss, key=lambda n: n.order),
                    sorted(ts, key=lambda n: n.order),
                    strict=True,
                )
            )
        self.result.conflicts.append(Conflict(ss, ts))
        return pairs

    def ordered_tgt_names(self, ts: list[Node]) -> bool:
        return self.ordered


def _index_like(nodes: Sequence[Node], *, use_path: bool = False) -> bool:
    """Names (or full paths) that differ only in their numbers (``0``, ``1``; ``Dense_0``...)."""
    keys = [n.path if use_path else n.name for n in nodes]
    if len(set(keys)) != len(keys):  # two nodes both called "1" (conv.0.1, conv.1.1) say nothing
        return False
    stems = {re.sub(r"\d+", "#", k) for k in keys}
    return len(stems) == 1 and "#" in next(iter(stems))


def _unique_best_assignment(ss: list[Node], ts: list[Node]) -> list[tuple[Node, Node]] | None:
    """The one assignment that maximises name similarity, if it is unique and every pair shares a word."""
    score = [[_similarity(s, t) for s in ss] for t in ts]
    n = len(ts)
    if n > 7:  # too many for brute force: accept only mutually-best, distinct pairs
        cols = [max(range(n), key=row.__getitem__) for row in score]
        if len(set(cols)) != n or any(score[i][cols[i]] <= 0 for i in range(n)):
            return None
        if any(sorted(score[i])[-2] == score[i][cols[i]] for i in range(n)):
            return None
        return [(ss[cols[i]], ts[i]) for i in range(n)]
    totals = []
    for perm in itertools.permutations(range(n)):
        if any(score[i][perm[i]] <= 0 for i in range(n)):
            continue
        totals.append((sum(score[i][perm[i]] for i in range(n)), perm))
    if not totals:
        return None
    totals.sort(reverse=True)
    if len(totals) > 1 and math.isclose(totals[0][0], totals[1][0]):
        return None
    perm = totals[0][1]
    return [(ss[perm[i]], ts[i]) for i in range(n)]


# Words that name a parameter's role, not which module it belongs to.
_ROLE_WORDS = frozenset(
    {
        "weight",
        "kernel",
        "bias",
        "w",
        "b",
        "scale",
        "gamma",
        "beta",
        "params",
        "batch",
        "stats",
        "offset",
        "embedding",
        "embed",
    }
)


def _similarity(s: Node, t: Node) -> float:
    """Word overlap of two nodes' paths (Jaccard), role words left out."""
    a, b = tokens(s.path) - _ROLE_WORDS, tokens(t.path) - _ROLE_WORDS
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def _is_definition_order(specs: Sequence[TensorSpec]) -> bool:
    """False when names arrive sorted (jax pytrees, safetensors files): order then says nothing."""
    names = [s.name for s in specs]
    return names != sorted(names) and names != sorted(names, key=natural_key)


@dataclass(frozen=True)
class Matcher:
    """Callable that pairs what renames left unpaired; plugs into `planner.make_plan`."""

    from_framework: str | None = None
    to_framework: str | None = None
    hints: tuple[Hint, ...] = ()
    log: list[str] = field(default_factory=list, compare=False)
    partial: bool = False
    slice_mismatched: bool = False

    def __call__(
        self, sources: Sequence[TensorSpec], targets: Sequence[TensorSpec]
    ) -> list[tuple[str, tuple[str, ...], tuple[Op, ...]]]:
        pairs, _ = match_specs(
            sources,
            targets,
            from_framework=self.from_framework,
            to_framework=self.to_framework,
            hints=self.hints,
            log=self.log,
            partial=self.partial,
            slice_mismatched=self.slice_mismatched,
        )
        return pairs


def match_specs(
    sources: Sequence[TensorSpec],
    targets: Sequence[TensorSpec],
    *,
    from_framework: str | None = None,
    to_framework: str | None = None,
    hints: Sequence[Hint] = (),
    log: list[str] | None = None,
    partial: bool = False,
    slice_mismatched: bool = False,
) -> tuple[list[tuple[str, tuple[str, ...], tuple[Op, ...]]], list[str]]:
    """Pair target tensors with source tensors; returns (pairs with ops, dropped source names).

    When one-to-one pairing fails, it is retried with fused (qkv, in_proj) and stacked
    (experts) tensors on either side split into virtual parts (`weightbridge.fused`).

    Raises:
        MatchError: ambiguous ties (with the hint that resolves them), unpaired tensors (both
            sides, with shapes), or pairs whose shapes cannot be made to fit.
    """
    log = log if log is not None else []
    dropped = [s.name for s in sources if is_buffer(s.name)]
    src = [s for s in sources if not is_buffer(s.name)]
    tgt = [t for t in targets if not is_buffer(t.name)]
    fam = (
        guess_family([s.name for s in src], from_framework),
        guess_family([t.name for t in tgt], to_framework),
    )
    log.append(
        f"source layout: {fam[0]}; target layout: {fam[1]}; "
        f"{len(src)} source and {len(tgt)} target tensors ({len(dropped)} buffers dropped)"
    )
    out, failure = _match_once(src, tgt, fam, hints, log, slice_mismatched, {}, {})
    if failure:
        vsrc, sparts = split_fused(src, fam[0] == "pytorch")
        vtgt, tparts = split_fused(tgt, fam[1] == "pytorch")
        if sparts or tparts:
            log.append(
                f"one-to-one pairing failed; retrying with {len(sparts)} source and "
                f"{len(tparts)} target fused/stacked parts split out"
            )
            retry, second = _match_once(
                vsrc, vtgt, fam, hints, log, slice_mismatched, sparts, tparts
            )
            if not second:
                return retry, dropped
    if failure and not partial:
        raise MatchError(failure)
    if failure:
        log.append("partial: left unpaired (they keep their own values):\n" + failure)
    return out, dropped


def _match_once(
    src: list[TensorSpec],
    tgt: list[TensorSpec],
    fam: tuple[str, str],
    hints: Sequence[Hint],
    log: list[str],
    slice_mismatched: bool,
    sparts: dict[str, Part],
    tparts: dict[str, Part],
) -> tuple[list[tuple[str, tuple[str, ...], tuple[Op, ...]]], str]:
    """One matching pass; returns (pairs with ops, failure message or "")."""
    src_family, tgt_family = fam
    src_tree, tgt_tree = build_tree(src, src_family, tgt_family), build_tree(tgt, tgt_family)
    m = _Matcher(hints, _is_definition_order(src), _is_definition_order(tgt))
    m.descend(src_tree, tgt_tree)
    result = m.result
    log.append(
        f"paired {len(result.pairs)} tensors by structure; {len(result.conflicts)} ambiguous "
        f"group(s), {len(result.unpaired_targets)} target(s) unpaired"
    )
    problems: list[str] = []
    out: list[tuple[str, tuple[str, ...], tuple[Op, ...]]] = []
    orders = (_is_definition_order(src), _is_definition_order(tgt))
    try:
        flatten = _flatten_pair(result.pairs, src_family, tgt_family, orders, hints, log)
    except MatchError as e:
        return [], str(e)
    origin_shape = {}
    groups: dict[str, dict[int, tuple[str, tuple[Op, ...]]]] = defaultdict(dict)
    for s, t in result.pairs:
        assert s.spec is not None and t.spec is not None
        channels = flatten[1] if flatten and flatten[0] is s else None
        ops = fit_ops(s.spec, t.spec, s.role, src_family, tgt_family, flatten_channels=channels)
        if ops is None:
            problems.append(
                f"paired {s.spec.name} {s.spec.shape} with {t.spec.name} {t.spec.shape} "
                "by structure, but no layout change makes one into the other"
            )
            continue
        sname = s.spec.name
        if sname in sparts:
            part = sparts[sname]
            whole = _origin_shape(part, s.spec.shape)
            ops = (*source_part_ops(part, whole), *ops)
            sname = part.origin
        if t.spec.name in tparts:
            tp = tparts[t.spec.name]
            groups[tp.origin][tp.index] = (sname, ops)
            origin_shape[tp.origin] = tp
        else:
            out.append((t.spec.name, (sname,), ops))
    for origin, members in groups.items():
        tp = origin_shape[origin]
        if len(members) != tp.count:
            problems.append(f"{origin}: only {len(members)} of its {tp.count} parts found sources")
            continue
        ordered = [members[i] for i in range(tp.count)]
        part_shape = next(
            t.spec.shape
            for _, t in result.pairs
            if t.spec and t.spec.name in tparts and tparts[t.spec.name].origin == origin
        )
        joined = join_ops(tp, [ops for _, ops in ordered], part_shape)
        if joined is None:
            problems.append(
                f"{origin}: its parts need different layout changes; join them with a rule"
            )
            continue
        out.append((origin, tuple(name for name, _ in ordered), joined))
        log.append(f"{origin}: {'stacked' if tp.stacked else 'concatenated'} from {tp.count} parts")
    if slice_mismatched:
        out += _slice_mismatched(
            result, src_family, tgt_family, log, (tokens(src_tree.name), tokens(tgt_tree.name))
        )
    # A source module maps whole or not at all: a module the target lacks entirely (a pooler,
    # a classification head) is left out and reported as unused, but a lone leftover tensor of
    # a module whose other tensors were used (a bias: use_bias differs) is an error.
    used_modules = {_parent(s.path) for s, _ in result.pairs}
    stray = [n for n in result.unpaired_sources if _parent(n.path) in used_modules]
    if stray and not (result.conflicts or result.unpaired_targets or problems):
        result.unpaired_sources = stray
    if result.conflicts or result.unpaired_targets or stray or problems:
        return out, _failure_message(result, problems)
    for n in result.unpaired_sources:
        log.append(f"unused: {n.path} (its whole module has no counterpart in the target)")
    return out, ""


def _parent(path: str) -> str:
    return re.split(r"[./](?=[^./]*$)", path)[0] if re.search(r"[./]", path) else ""


def _origin_shape(part: Part, shape: tuple[int, ...]) -> tuple[int, ...]:
    if part.stacked:
        return (part.count, *shape)
    whole = list(shape)
    whole[part.axis] *= part.count
    return tuple(whole)


def _slice_mismatched(
    result: MatchResult,
    src_family: str,
    tgt_family: str,
    log: list[str],
    prefixes: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset()),
) -> list[tuple[str, tuple[str, ...], tuple[Op, ...]]]:
    """Pair leftovers that share a name and role but not a shape, copying the overlapping block.

    Only targets no larger than their source on every axis are filled (a 1000-class head into a
    10-class one); a larger target keeps its own values.
    """
    from weightbridge.layouts import layout_permutation

    out: list[tuple[str, tuple[str, ...], tuple[Op, ...]]] = []
    by_key: dict[object, list[Node]] = defaultdict(list)
    for s in result.unpaired_sources:
        by_key[(s.role, tokens(s.path) - prefixes[0])].append(s)
    still: list[Node] = []
    for t in result.unpaired_targets:
        cands = by_key.get((t.role, tokens(t.path) - prefixes[1]), [])
        if len(cands) != 1 or cands[0].spec is None or t.spec is None:
            still.append(t)
            continue
        s = cands[0]
        assert s.spec is not None
        perm = (
            layout_permutation(len(s.spec.shape), src_family, tgt_family)
            if s.role == "matrix"
            else ()
        )
        shape = s.spec.shape
        for op in perm:
            shape = op.out_shape([shape])
        if len(shape) != len(t.spec.shape) or any(
            tdim > sdim for tdim, sdim in zip(t.spec.shape, shape, strict=True)
        ):
            still.append(t)
            continue
        from weightbridge.ops import Slice

        slices = tuple(Slice(ax, 0, d) for ax, d in enumerate(t.spec.shape) if d != shape[ax])
        out.append((t.spec.name, (s.spec.name,), (*perm, *slices)))
        cands.remove(s)
        result.unpaired_sources.remove(s)
        log.append(
            f"sliced: {t.spec.name} {t.spec.shape} takes the leading block of {s.spec.name} {s.spec.shape}"
        )
    result.unpaired_targets = still
    return out


FLATTEN_HINT = "@flatten"
# For models that transpose to NCHW before flattening (seed 003's own JModel does), where the
# regrouping would be wrong and nothing in the weights shows it.
NO_FLATTEN_HINT = "@noflatten"


def _flatten_pair(
    pairs: list[tuple[Node, Node]],
    src_family: str,
    tgt_family: str,
    orders: tuple[bool, bool],
    hints: Sequence[Hint],
    log: list[str],
) -> tuple[Node, int] | None:
    """The dense layer right after a conv stack, whose input is a flattened feature map.

    torch flattens NCHW, the others NHWC, so that one kernel needs its input axis regrouped.
    Shapes give the channels C (the last conv's outputs) but not which dense layer follows the
    flatten. With either side in definition order (a torch state dict), it is the first dense
    layer after the last conv in that order; otherwise it must be the only dense layer whose
    fan-in is a multiple of C, or be named by the hint ``("@flatten", "<target substring>")``.
    ``("@noflatten", "")`` turns this off, for models that flatten in NCHW order on both sides.

    Raises:
        MatchError: several dense layers could follow the flatten and nothing says which.
    """
    if (src_family == "pytorch") == (tgt_family == "pytorch"):
        return None
    torch_side = src_family == "pytorch"
    convs = [(s, t) for s, t in pairs if s.role == "matrix" and s.spec and len(s.spec.shape) == 4]
    if not convs:
        return None
    src_ordered, tgt_ordered = orders

    def key(pair: tuple[Node, Node]) -> tuple[object, ...]:
        if src_ordered:
            return (pair[0].order,)
        if tgt_ordered:
            return (pair[1].order,)
        return natural_key(pair[1].path)

    last_s, last_t = max(convs, key=key)
    # The torch side's [O, I/g, kh, kw] always gives the output channels (a Keras depthwise
    # kernel [kh, kw, C, M] would not: its outputs are C*M).
    torch_kernel = last_s.spec if torch_side else last_t.spec
    assert torch_kernel is not None
    channels = torch_kernel.shape[0]

    def fan_in(n: Node) -> int:
        assert n.spec is not None
        return n.spec.shape[1] if torch_side else n.spec.shape[0]

    dense = [
        (s, t)
        for s, t in pairs
        if s.role == "matrix"
        and s.spec
        and len(s.spec.shape) == 2
        and t.spec
        and len(t.spec.shape) == 2
        and not is_embedding(s.path)
    ]
    if any(h[0] == NO_FLATTEN_HINT for h in hints):
        return None
    hinted = [p for p in dense for h in hints if h[0] == FLATTEN_HINT and h[1] in p[1].path]
    chosen: Node | None
    if hinted:
        chosen = hinted[0][0]
    elif src_ordered or tgt_ordered:
        last = max(key(c) for c in convs)
        after = sorted((p for p in dense if key(p) > last), key=key)
        chosen = after[0][0] if after else None
    else:
        fits = [s for s, _ in dense if fan_in(s) % channels == 0 and fan_in(s) // channels > 1]
        if len(fits) > 1:
            names = [t.path for s, t in dense if s in fits]
            raise MatchError(
                f"cannot tell which dense layer follows the flatten after the conv stack "
                f"({channels} channels): any of {names[:4]} could, and neither side keeps "
                "definition order. Name it with hints=[('@flatten', '<part of its target name>')] "
                "(CLI: --hint @flatten=NAME)"
            )
        chosen = fits[0] if fits else None
    if chosen is None or fan_in(chosen) % channels or fan_in(chosen) // channels < 2:
        return None
    log.append(
        f"{chosen.path}: follows a conv stack through a flatten; regrouping its input from "
        f"{'NCHW' if torch_side else 'NHWC'} to {'NHWC' if torch_side else 'NCHW'} order "
        f"({channels} channels)"
    )
    return chosen, channels


def _describe(n: Node) -> str:
    assert n.spec is not None
    return f"{n.spec.name} {n.spec.shape}"


def _failure_message(result: MatchResult, problems: list[str]) -> str:
    lines = ["failed to pair the following tensors:"]
    for c in result.conflicts:
        lines.append(
            "  ambiguous: these have the same shapes, and neither names nor order tell "
            "which is which:"
        )
        for t in c.targets:
            lines += [f"    OUT {_describe(leaf)}" for leaf in t.leaves()]
        for s in c.sources:
            lines += [f"    IN  {_describe(leaf)}" for leaf in s.leaves()]
        t_sub, s_sub = _unique_part(c.targets[0], c.targets), _unique_part(c.sources[0], c.sources)
        lines.append(
            f"    if {c.targets[0].path!r} corresponds to {c.sources[0].path!r}, pass "
            f"hints=[({t_sub!r}, {s_sub!r})] (CLI: --hint {t_sub}={s_sub})"
        )
    if result.unpaired_targets or result.unpaired_sources:
        lines.append("  no counterpart with a matching role and size:")
        lines += [f"    OUT {_describe(n)} [{n.role}]" for n in result.unpaired_targets[:40]]
        lines += [f"    IN  {_describe(n)} [{n.role}]" for n in result.unpaired_sources[:40]]
        bias = _bias_mismatch(result)
        if bias:
            lines.append(f"  {bias}")
    lines += [f"  {p}" for p in problems[:20]]
    return "\n".join(lines)


def _unique_part(node: Node, group: Sequence[Node]) -> str:
    return node.name if all(node.name not in o.path for o in group if o is not node) else node.path


def _bias_mismatch(result: MatchResult) -> str:
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
