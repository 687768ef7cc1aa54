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

Each pair then gets its ops from `weightbridge.planning.layouts`: chosen by the parameter's role and
the shape the target demands, not by rank alone. What the matcher does not do: split or fuse
tensors (see the rules), or check hyperparameters other than what shapes reveal.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from weightbridge.errors import MatchError
from weightbridge.ops import Op
from weightbridge.planning.fused import Part, join_ops, source_part_ops, split_fused
from weightbridge.planning.layouts import (
    fit_ops,
    guess_family,
    is_buffer,
    is_embedding,
    layout_permutation,
    leaf_role,
)
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


# Whole name components that name a norm's *position* in a pre-norm transformer block, where
# word overlap misleads: LLaMA's ``post_attention_layernorm`` is the norm before the MLP and
# shares "attention" with Flax's ``pre_attn_norm``. Such a component becomes one concept token.
# A concept claimed by two components on one side is no evidence (Gemma 2 has both
# ``post_attention_layernorm`` and ``pre_feedforward_layernorm``), so the matcher refuses there.
_POSITION_CONCEPTS = {
    "@norm_attn": (
        "input_layernorm|input_layer_norm|attention_norm|attn_norm|pre_attn_norm|"
        "pre_attention_norm|pre_attention_layernorm|ln_1|ln1|layernorm_before|norm1|"
        "self_attn_layer_norm|layer_norm1|attn_ln|ln_attn"
    ),
    "@norm_mlp": (
        "post_attention_layernorm|ffn_norm|mlp_norm|pre_mlp_norm|pre_ffn_norm|pre_ffw_norm|"
        "pre_feedforward_layernorm|ln_2|ln2|layernorm_after|norm2|final_layer_norm|"
        "layer_norm2|mlp_ln|ln_mlp"
    ),
}
_CONCEPT = {
    phrase: concept for concept, alts in _POSITION_CONCEPTS.items() for phrase in alts.split("|")
}


def tokens(name: str) -> frozenset[str]:
    """Normalised word tokens of a name (digits dropped, synonyms folded).

    >>> sorted(tokens("encoder.layer.0.attention.self.query"))
    ['attn', 'encoder', 'layer', 'q']
    >>> sorted(tokens("layers.0.post_attention_layernorm"))
    ['@norm_mlp', 'attn', 'layer', 'norm', 'post']
    """
    # str.split on one separator is ~3x faster than re.split on three
    parts = name.replace(":0", "").replace("/", ".").replace("~", ".").split(".")
    # Per component, cached: full paths are unique (every expert of every layer has its own)
    # but are made of the same few components.
    return frozenset().union(*map(_part_tokens, parts))


@functools.lru_cache(maxsize=1 << 16)
def _part_tokens(part: str) -> frozenset[str]:
    """`tokens` of one name component."""
    part = _CAMEL.sub(r"\1_\2", part).lower()
    out: set[str] = set()
    concept = _CONCEPT.get(part)
    if concept:
        out.add(concept)
    out.update(_SYNONYMS.get(w, w) for w in _NON_LETTERS.split(part) if w)
    return frozenset(out)


_CAMEL = re.compile(r"([a-z])([A-Z])")
_NON_LETTERS = re.compile(r"[^a-z]+")


@functools.lru_cache(maxsize=1 << 16)
def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``layer_2`` before ``layer_10`` (cached: tied groups of every layer
    sort the same short names, ``experts_17``, again and again)."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGIT_RUNS.split(name))


_DIGIT_RUNS = re.compile(r"(\d+)")


# Nodes compare by identity: two nodes are the same node, never merely equal (a source and a
# target subtree can hold the same names and shapes; field-wise equality would mix them up in
# `list.remove` and `in`, and costs a deep comparison each time).
@dataclass(eq=False, slots=True)
class Node:
    """A module (or a leaf tensor) in one side's name tree."""

    name: str  # this node's own name component(s)
    path: str  # full path, for messages and hints
    order: int  # position of its first tensor in that side's checkpoint order
    children: dict[str, Node] = field(default_factory=dict)
    spec: TensorSpec | None = None  # set on leaves
    role: str = ""
    key: tuple[int, ...] = ()  # oriented shape, see _oriented
    embedding: bool = False  # leaves: `is_embedding(path)`, computed once in `build_tree`
    # Per orientation, set by `orient_and_sign` (`orient` resets them): the strict and relaxed
    # signatures as ids, the signatures of the subtrees inside, and the number of leaves.
    sig: int = field(default=-1, repr=False)
    rsig: int = field(default=-1, repr=False)
    inner: frozenset[int] = field(default=frozenset(), repr=False)
    rinner: frozenset[int] = field(default=frozenset(), repr=False)
    size: int = field(default=0, repr=False)
    real: str | None = field(default=None, repr=False)  # see `real_path`

    @property
    def is_leaf(self) -> bool:
        return self.spec is not None

    def leaves(self) -> list[Node]:
        """The subtree's leaves, depth first."""
        if self.spec is not None:
            return [self]
        out: list[Node] = []
        _collect_leaves(self, out)
        return out


def _collect_leaves(node: Node, out: list[Node]) -> None:
    # Into one list, not one per level. (Not a closure: a recursive closure is a reference
    # cycle, which keeps `out` and its nodes alive until the cyclic GC runs.)
    for c in node.children.values():
        if c.spec is not None:
            out.append(c)
        else:
            _collect_leaves(c, out)


def _components(name: str) -> list[str]:
    if ":0" in name or "~" in name:
        parts = [p.replace(":0", "") for p in _split(name) if p and p != "~"]
    else:
        parts = _split(name)
        if "" in parts:
            parts = [p for p in parts if p]
    if parts and parts[0] in ("params", "batch_stats", "model_weights"):
        del parts[0]
    if len(set(parts)) == len(parts):
        return parts or [name]  # no repeated component, so none to drop (the usual case)
    out: list[str] = []
    for p in parts:
        # Keras h5 repeats the layer name (dense/dense/kernel); "conv.0.0" is two real levels.
        if not out or out[-1] != p or p.isdigit():
            out.append(p)
    return out or [name]


def _split(name: str) -> list[str]:
    """``re.split(r"[./]", name)``, ~3x faster (this runs on every name, several times)."""
    return name.replace("/", ".").split(".")


def build_tree(
    specs: Sequence[TensorSpec],
    family: str,
    into: str | None = None,
    transpose2d: bool | None = None,
) -> Node:
    """The module tree of one side; `into` (the other side's layout) orients source kernels,
    `transpose2d` says whether its 2-D kernels are transposed on the way (see `orient`)."""
    root = Node("", "", 0)
    # Every node made, kept while building so that the passes below need no tree walk (a
    # module replaced under the same key is visited too: harmless, it is unreachable).
    modules, leaves = [root], []
    for i, spec in enumerate(specs):
        parts = _components(spec.name)
        node = root
        for depth in range(len(parts) - 1):
            part = parts[depth]
            child = node.children.get(part)
            if child is None or child.spec is not None:
                key = part if child is None else part + "/"
                child = node.children[key] = Node(part, "/".join(parts[: depth + 1]), i)
                modules.append(child)
            node = child
        leaf = parts[-1]
        while leaf in node.children:
            leaf += "'"
        node.children[leaf] = child = Node(leaf, spec.name, i, spec=spec)
        leaves.append(child)
    for node in modules:
        siblings = {c.name: c.spec for c in node.children.values() if c.spec is not None}
        for child in node.children.values():
            if child.spec is not None:
                child.role = leaf_role(child.name, child.spec.shape, siblings, family, child.path)
                child.embedding = child.role == "matrix" and is_embedding(child.path)
    oriented: dict[tuple[object, ...], tuple[int, ...]] = {}  # leaves alike are oriented alike
    for child in leaves:
        assert child.spec is not None
        alike = (child.role, child.embedding, child.spec.shape)
        shape_key = oriented.get(alike)
        if shape_key is None:
            shape_key = oriented[alike] = _oriented(child, family, into, transpose2d)
        child.key = shape_key
    _collapse(root)
    return root


def orient(root: Node, family: str, into: str | None, transpose2d: bool | None) -> None:
    """(Re)compute every leaf's oriented shape and drop the signatures (see `orient_and_sign`)."""
    root.sig = root.rsig = -1
    for child in root.children.values():
        if child.spec is None:
            orient(child, family, into, transpose2d)
        else:
            child.sig = child.rsig = -1
            child.key = _oriented(child, family, into, transpose2d)


def _all_internal(node: Node) -> list[Node]:
    """`node` and every module under it, depth first."""
    out: list[Node] = []
    _collect_internal(node, out)
    return out


def _collect_internal(node: Node, out: list[Node]) -> None:
    out.append(node)  # into one list, not one per level (see `_collect_leaves`)
    for c in node.children.values():
        if c.spec is None:
            _collect_internal(c, out)


def _collapse(node: Node) -> None:
    """Merge chains of single-child modules (``module.``, ``backbone.0.body.``) into one node."""
    while len(node.children) == 1:
        (only,) = node.children.values()
        if only.spec is not None:
            break
        node.children = only.children
        node.name = f"{node.name}.{only.name}" if node.name else only.name
        node.path = only.path
    for c in node.children.values():
        if c.spec is None:
            _collapse(c)


def _oriented(
    leaf: Node, family: str, into: str | None, transpose2d: bool | None
) -> tuple[int, ...]:
    """A leaf's shape as the other side would hold it (kernels permuted to its layout), with
    size-1 axes dropped: [32, 8] torch up_proj and [8, 32] Flax wi agree, and so up and down
    projections of the same size are told apart by orientation."""
    assert leaf.spec is not None
    shape = leaf.spec.shape
    if into is not None and leaf.role == "matrix" and not leaf.embedding:
        if len(shape) == 2 and transpose2d is not None:
            shape = shape[::-1] if transpose2d else shape
        else:
            for op in layout_permutation(len(shape), family, into):
                shape = op.out_shape([shape])
    return shape if 1 not in shape else tuple(d for d in shape if d != 1)


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


class _Signer:
    """Signatures of one kind (strict or relaxed) as small ints, shared by the two trees of a
    matching pass: equal multisets of leaf keys get equal ids, so grouping and the `hidden`
    test compare ints. Sibling modules repeat (every expert of every layer), so a node's id is
    looked up by its children's ids, and multisets are merged only for a new combination."""

    def __init__(self) -> None:
        self.ids: dict[frozenset[tuple[object, int]], int] = {}  # multiset -> id
        self.multisets: list[frozenset[tuple[object, int]]] = []  # id -> multiset
        self.leaves: dict[object, int] = {}  # leaf key -> id of {key: 1}
        self.sums: dict[tuple[int, ...], int] = {}  # sorted children's ids -> id
        self.inners: dict[tuple[frozenset[int], frozenset[frozenset[int]]], frozenset[int]] = {}

    def _intern(self, multiset: frozenset[tuple[object, int]]) -> int:
        i = self.ids.get(multiset)
        if i is None:
            i = self.ids[multiset] = len(self.multisets)
            self.multisets.append(multiset)
        return i

    def leaf(self, key: object) -> int:
        i = self.leaves.get(key)
        if i is None:
            i = self.leaves[key] = self._intern(frozenset({(key, 1)}))
        return i

    def sum(self, ids: tuple[int, ...]) -> int:
        """The id of the sum of the multisets `ids` (sorted)."""
        i = self.sums.get(ids)
        if i is None:
            counts: dict[object, int] = {}
            for j in ids:
                for k, n in self.multisets[j]:
                    counts[k] = counts.get(k, 0) + n
            i = self.sums[ids] = self._intern(frozenset(counts.items()))
        return i

    def inner(self, sigs: frozenset[int], inners: frozenset[frozenset[int]]) -> frozenset[int]:
        """The children's signatures and those inside them (one shared set per combination)."""
        key = (sigs, inners)
        out = self.inners.get(key)
        if out is None:
            out = self.inners[key] = sigs.union(*inners)
        return out


Orientation = tuple[str, str | None, bool | None]  # family, into, transpose2d: see `orient`


def orient_and_sign(*sides: tuple[Node, Orientation]) -> None:
    """`orient` each tree, then give every node its signatures, inner signatures and leaf
    count, bottom-up: one walk per tree, with ids shared by all of them (see `_Signer`)."""
    strict, relaxed = _Signer(), _Signer()
    for root, orientation in sides:
        _Signing(strict, relaxed, orientation).sign(root)


class _Signing:
    """One tree's walk for `orient_and_sign`."""

    def __init__(self, strict: _Signer, relaxed: _Signer, orientation: Orientation) -> None:
        self.strict, self.relaxed, self.orientation = strict, relaxed, orientation
        # Leaves alike (role, embedding or not, shape) get the same key and ids: once each.
        self.leaves: dict[tuple[object, ...], tuple[tuple[int, ...], int, int]] = {}
        self.singles: dict[tuple[int, int], tuple[frozenset[int], frozenset[int]]] = {}
        self.modules: dict[tuple[object, ...], tuple[int, int, frozenset[int], frozenset[int]]] = {}

    def leaf(self, c: Node) -> None:
        assert c.spec is not None
        alike = (c.role, c.embedding, c.spec.shape)
        done = self.leaves.get(alike)
        if done is None:
            key = _oriented(c, *self.orientation)
            done = self.leaves[alike] = (
                key,
                self.strict.leaf((c.role, key)),
                self.relaxed.leaf((c.role, c.spec.numel)),
            )
        c.key, c.sig, c.rsig = done
        c.size = 1

    def sign(self, node: Node) -> None:
        if len(node.children) == 1:  # a module holding one tensor: the most common node
            (c,) = node.children.values()
            if c.spec is not None:
                self.leaf(c)
                node.sig, node.rsig, node.size = c.sig, c.rsig, 1
                inners = self.singles.get((c.sig, c.rsig))
                if inners is None:
                    inners = self.singles[c.sig, c.rsig] = (
                        frozenset((c.sig,)),
                        frozenset((c.rsig,)),
                    )
                node.inner, node.rinner = inners
                return
        size = 0
        for c in node.children.values():
            if c.spec is not None:
                self.leaf(c)
                size += 1
            else:
                self.sign(c)
                size += c.size
        node.size = size
        # A module's ids follow from its children's: modules alike (every expert) look them up.
        alike = tuple([(c.sig, c.rsig, c.inner, c.rinner) for c in node.children.values()])
        done = self.modules.get(alike)
        if done is None:
            sigs = [c.sig for c in node.children.values()]
            rsigs = [c.rsig for c in node.children.values()]
            inners_s = {c.inner for c in node.children.values() if c.spec is None}
            inners_r = {c.rinner for c in node.children.values() if c.spec is None}
            strict, relaxed = self.strict, self.relaxed
            done = self.modules[alike] = (
                # the sum of one multiset is itself
                sigs[0] if len(sigs) == 1 else strict.sum(tuple(sorted(sigs))),
                rsigs[0] if len(rsigs) == 1 else relaxed.sum(tuple(sorted(rsigs))),
                strict.inner(frozenset(sigs), frozenset(inners_s)),
                relaxed.inner(frozenset(rsigs), frozenset(inners_r)),
            )
        node.sig, node.rsig, node.inner, node.rinner = done


def signature(node: Node) -> int:
    """Multiset of (role, oriented shape) over a subtree's leaves, as an id (see `_Signer`)."""
    assert node.sig >= 0, "orient_and_sign first"
    return node.sig


def relaxed_signature(node: Node) -> int:
    """Multiset of (role, element count) over a subtree's leaves, as an id (see `_Signer`)."""
    assert node.rsig >= 0, "orient_and_sign first"
    return node.rsig


def _inner_signatures(node: Node, sig_of: Callable[[Node], int] = signature) -> frozenset[int]:
    """Signatures of every subtree strictly inside `node` (of the kind `sig_of` gives)."""
    return node.inner if sig_of is signature else node.rinner


def _leaf_count(node: Node) -> int:
    return node.size


@dataclass
class Conflict:
    """Tied nodes the matcher refused to pair by guessing."""

    sources: list[Node]
    targets: list[Node]
    why: str = "they have the same shapes, and neither names nor order tell which is which"


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
            big = max(internal, key=lambda n: (_leaf_count(n), id(n) in in_t))
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
                        hidden |= _inner_signatures(n, sig_of)
        for sig, ss in by_sig_s.items():
            if sig not in by_sig_t:  # a group with no target at all
                for n in ss:
                    if n.spec is None:
                        hidden |= _inner_signatures(n, sig_of)
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
            t_hit = _hint_hits(hint[0], r.unpaired_targets)
            s_hit = [
                s
                for s in _hint_hits(hint[1], r.unpaired_sources)
                if t_hit and _relaxed(s) == _relaxed(t_hit[0])
            ]
            if len(t_hit) == 1 and len(s_hit) == 1:
                self.hints_used.add(hint)
                r.pairs.append((s_hit[0], t_hit[0]))
                r.unpaired_sources.remove(s_hit[0])
                r.unpaired_targets.remove(t_hit[0])

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
            t_hit = _hint_hits(hint[0], ts)
            s_hit = _hint_hits(hint[1], ss)
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
            if _index_like(ss, use_path=use_path) and _index_like(ts, use_path=use_path):
                by_index = _index_pairs(ss, ts, use_path)
                if by_index is not None:
                    return pairs + by_index
                self.result.conflicts.append(
                    Conflict(ss, ts, "their numbers do not line up (one side skips some)")
                )
                return pairs + self.provisional(ss, ts)
        by_names = _unique_best_assignment(ss, ts)
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
            if same or _names_decide(by_names, ss, ts):
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
                inner = _Matcher(self.hints, self.ordered, self.ordered)
                inner.match(list(s.children.values()), list(t.children.values()), t.path)
                self.result.conflicts += inner.result.conflicts
                self.hints_used |= inner.hints_used
                self.bad_hints += inner.bad_hints
        return []


def _names_decide(pairs: list[tuple[Node, Node]], ss: list[Node], ts: list[Node]) -> bool:
    """Strong name evidence, which outweighs definition order: within each pair, the words
    that tell a node from its tied siblings are the same on both sides (``query`` and ``q``),
    not merely overlapping (``post_attention_layernorm`` and ``pre_attn_norm`` share "attn")."""
    own_s = dict(zip(map(id, ss), _own_words(ss), strict=True))
    own_t = dict(zip(map(id, ts), _own_words(ts), strict=True))
    return all(own_s[id(s)] and own_s[id(s)] == own_t[id(t)] for s, t in pairs)


def real_path(node: Node) -> str:
    """The node's name as the checkpoint spells it (``first.conv_a``, ``layers/dense/vars``):
    a tensor's own name, or the part its tensors' names share, cut at a separator. Hints are
    matched against this, so a suggested hint is always text the user can find."""
    if node.real is None:
        if node.spec is not None:
            node.real = node.spec.name
        else:
            names = [leaf.spec.name for leaf in node.leaves() if leaf.spec is not None]
            prefix = names[0] if len(names) == 1 else _common_prefix(names)
            cut = max(prefix.rfind("."), prefix.rfind("/"))
            node.real = prefix[:cut] if cut > 0 else prefix
    return node.real


def _common_prefix(names: list[str]) -> str:
    lo, hi = min(names), max(names)
    i = 0
    while i < min(len(lo), len(hi)) and lo[i] == hi[i]:
        i += 1
    return lo[:i]


def _hint_hits(sub: str, nodes: Sequence[Node]) -> list[Node]:
    """Nodes a hint substring names; a match ending at a name boundary wins over one inside a
    name (``layer_norm`` names ``.../layer_norm``, not ``.../layer_norm_1``)."""
    hits = [
        n
        for n in nodes
        if sub in real_path(n)
        or any(leaf.spec is not None and sub in leaf.spec.name for leaf in n.leaves())
    ]
    if len(hits) > 1:
        exact = [n for n in hits if real_path(n) == sub]
        if exact:
            return exact
        pattern = re.compile(re.escape(sub) + r"(?=$|[./:])")
        bounded = [n for n in hits if pattern.search(real_path(n))]
        if bounded:
            return bounded
    return hits


def _index_pairs(ss: list[Node], ts: list[Node], use_path: bool) -> list[tuple[Node, Node]] | None:
    """Pair numbered nodes in number order, if the numbers line up: the same on both sides up
    to one constant offset (``layer.0..11`` ~ ``layers_0..11``; Keras ``block1..`` ~ torch
    ``0..``). Numbers that do not (``1, 2, 3`` against ``0, 2, 3``: one side has an extra or
    a missing module) say that something else is going on."""
    order = _index_order(
        tuple(n.path if use_path else n.name for n in ss),
        tuple(n.path if use_path else n.name for n in ts),
    )
    return None if order is None else [(ss[i], ts[j]) for i, j in order]


@functools.lru_cache(maxsize=1024)
def _index_order(
    keys_s: tuple[str, ...], keys_t: tuple[str, ...]
) -> tuple[tuple[int, int], ...] | None:
    """`_index_pairs` on the names alone, as index pairs (cached: every layer's tied groups
    have the same names, ``experts.0`` to ``experts.63`` against ``experts_0`` to ...)."""
    a = sorted(range(len(keys_s)), key=lambda i: natural_key(keys_s[i]))
    b = sorted(range(len(keys_t)), key=lambda j: natural_key(keys_t[j]))
    va = _varying_numbers([keys_s[i] for i in a])
    vb = _varying_numbers([keys_t[j] for j in b])
    if va is None or vb is None:
        return None
    offsets = set()
    for x, y in zip(va, vb, strict=True):
        if len(x) != len(y):
            return None
        offsets.add(tuple(i - j for i, j in zip(x, y, strict=True)))
    return tuple(zip(a, b, strict=True)) if len(offsets) == 1 else None


def _varying_numbers(keys: list[str]) -> list[tuple[int, ...]] | None:
    """Each name's numbers at the positions where they differ across the group."""
    nums = [_numbers(k) for k in keys]
    if len({len(x) for x in nums}) != 1:
        return None
    varying = [i for i in range(len(nums[0])) if len({x[i] for x in nums}) > 1]
    return [tuple(x[i] for i in varying) for x in nums]


def _numbers(name: str) -> tuple[int, ...]:
    """The numbers in a name: `natural_key`'s odd items (cached there)."""
    return natural_key(name)[1::2]  # type: ignore[return-value]


def _index_like(nodes: Sequence[Node], *, use_path: bool = False) -> bool:
    """Names (or full paths) that differ only in their numbers (``0``, ``1``; ``Dense_0``...)."""
    if use_path:  # paths are unique to their group: nothing to gain from the cache
        return _keys_index_like(tuple(n.path for n in nodes))
    return _index_like_keys(tuple(n.name for n in nodes))


def _keys_index_like(keys: tuple[str, ...]) -> bool:
    """`_index_like` on the names alone."""
    if len(set(keys)) != len(keys):  # two nodes both called "1" (conv.0.1, conv.1.1) say nothing
        return False
    if "".join(keys).isascii() and len({k.translate(_NO_DIGITS) for k in keys}) > 1:
        return False  # they differ in more than numbers (a quick test before the regex)
    stems = {_stem(k) for k in keys}
    return len(stems) == 1 and "#" in next(iter(stems))


# Cached: every layer's tied groups have the same names.
_index_like_keys = functools.lru_cache(maxsize=1024)(_keys_index_like)


@functools.lru_cache(maxsize=1 << 16)
def _stem(name: str) -> str:
    """`name` with each run of digits replaced by ``#`` (cached like `natural_key`)."""
    return _DIGITS.sub("#", name)


_DIGITS = re.compile(r"\d+")
_NO_DIGITS = str.maketrans("", "", "0123456789")


def _unique_best_assignment(ss: list[Node], ts: list[Node]) -> list[tuple[Node, Node]] | None:
    """Pairs by name, only where the names decide.

    Only the words that tell a node from its tied siblings count (``q`` in ``attn.q``; the
    shared ``encoder.layer.3`` says nothing), and the evidence for a pair is how many of them
    it shares. In rounds, a pair is fixed when each node is the other's unique best among those
    still open and they share a word; fixed pairs leave the table. A last pair left over is
    taken only when every fixed pair was certain (the same distinguishing words on both
    sides). A maximal total over all permutations would let two weak overlaps outvote one
    strong one, and similarity ratios would reward a name for being short: neither is used.
    """
    chosen = _best_by_words(tuple(_own_words(ss)), tuple(_own_words(ts)))
    return None if chosen is None else [(ss[j], ts[i]) for i, j in enumerate(chosen)]


@functools.lru_cache(maxsize=1024)
def _best_by_words(
    own_s: tuple[frozenset[str], ...], own_t: tuple[frozenset[str], ...]
) -> tuple[int, ...] | None:
    """`_unique_best_assignment` on the distinguishing words alone: for each target, the index
    of its source (cached: every expert of every layer has the same ``gate`` and ``up``)."""
    score = {
        (i, j): _shared(own_s[j], own_t[i]) for i in range(len(own_t)) for j in range(len(own_s))
    }
    rows, cols = set(range(len(own_t))), set(range(len(own_s)))
    chosen: dict[int, int] = {}
    certain = True
    while rows:
        fixed = []
        for i in rows:
            row = {j: score[i, j] for j in cols}
            best = max(row.values())
            js = [j for j, v in row.items() if v == best]
            if best <= 0 or len(js) != 1:
                continue
            column = [score[k, js[0]] for k in rows]
            if column.count(best) == 1 and max(column) == best:
                fixed.append((i, js[0]))
        if not fixed:
            if len(rows) == 1 and chosen and certain:
                fixed = [(next(iter(rows)), next(iter(cols)))]
            else:
                return None
        for i, j in fixed:
            certain = certain and bool(own_t[i]) and own_t[i] == own_s[j]
            chosen[i] = j
            rows.discard(i)
            cols.discard(j)
    return tuple(chosen[i] for i in range(len(own_t)))


def _own_words(nodes: list[Node]) -> list[frozenset[str]]:
    """Each node's name words that its tied siblings do not all share (role words left out)."""
    paths = [n.path for n in nodes]
    head, lasts = _common_head(paths)
    if head is None:
        return list(_distinct_words(tuple(tokens(p) for p in paths)))
    # Siblings under one head: a path's tokens are its head's and its last component's, so
    # the answer follows from the head's words and the last components, which are the same
    # for every expert of every layer (cached).
    return list(_own_words_under(_head_tokens(head), lasts))


def _common_head(paths: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """The head all `paths` share before their last component, and those last components; or
    None when they differ (or a path holds ``:0``, which `tokens` drops before splitting)."""
    head: str | None = None
    lasts = []
    for path in paths:
        cut = max(path.rfind("."), path.rfind("/"), path.rfind("~"))
        if cut < 0 or ":0" in path or (head is not None and path[:cut] != head):
            return None, ()
        head = path[:cut]
        lasts.append(path[cut + 1 :])
    return head, tuple(lasts)


@functools.lru_cache(maxsize=1024)
def _own_words_under(
    head_words: frozenset[str], lasts: tuple[str, ...]
) -> tuple[frozenset[str], ...]:
    return _distinct_words(tuple(head_words | _part_tokens(last) for last in lasts))


def _distinct_words(words: tuple[frozenset[str], ...]) -> tuple[frozenset[str], ...]:
    """`_own_words` from each node's tokens."""
    words = tuple(w - _ROLE_WORDS for w in words)
    common = frozenset.intersection(*words) if words else frozenset()
    return tuple(w - common for w in words)


@functools.lru_cache(maxsize=1 << 14)
def _head_tokens(head: str) -> frozenset[str]:
    """`tokens` of a path without ``:0``, from its own head's (cached: every expert's head is
    new, but the layer's above it is not)."""
    cut = max(head.rfind("."), head.rfind("/"), head.rfind("~"))
    if cut < 0:
        return _part_tokens(head)
    return _head_tokens(head[:cut]) | _part_tokens(head[cut + 1 :])


def _shared(a: frozenset[str], b: frozenset[str]) -> int:
    """Distinguishing words two names share; none when they name different norm positions."""
    ca = {w for w in a if w.startswith("@")}
    cb = {w for w in b if w.startswith("@")}
    if ca and cb and not ca & cb:
        return 0
    return len(a & b)


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
    concepts_a = {w for w in a if w.startswith("@")}
    concepts_b = {w for w in b if w.startswith("@")}
    if concepts_a and concepts_b and not concepts_a & concepts_b:
        return 0.0  # two norms named for different positions, whatever words they share
    return len(a & b) / len(a | b)


def _is_definition_order(specs: Sequence[TensorSpec]) -> bool:
    """Whether the order of `specs` can be a module tree's definition order.

    False when names arrive sorted (jax pytrees, safetensors files): order then says nothing.
    False too when some module's tensors are not contiguous: a definition order lists each
    module's tensors together (a depth-first walk), and an order that interleaves them was
    shuffled or rebuilt, so it says nothing either.
    """
    names = [s.name for s in specs]
    # "Equals its sorted copy" is "never descends": one pass that stops at the first descent.
    if all(a <= b for a, b in itertools.pairwise(names)):
        return False
    if all(a <= b for a, b in itertools.pairwise(map(natural_key, names))):
        return False
    # Contiguity in one pass: a module is closed when a name leaves it, and a closed module
    # must not come back. Modules are strings ("a.b" for a/b/w, "/" read as "."), each name's
    # walked up from its own only as far as it differs from the previous name's.
    closed: set[str] = set()
    prev: str | None = None  # the previous name's module (None: at the top level)
    for name in names:
        path = name.replace("/", ".")
        cut = path.rfind(".")
        module = path[:cut] if cut >= 0 else None
        if module == prev:
            continue
        m = prev
        while m is not None and (module is None or not _within(module, m)):
            closed.add(m)  # left
            cut = m.rfind(".")
            m = m[:cut] if cut >= 0 else None
        m = module
        while m is not None and (prev is None or not _within(prev, m)):
            if m in closed:  # entered again
                return False
            cut = m.rfind(".")
            m = m[:cut] if cut >= 0 else None
        prev = module
    return True


def _within(module: str, outer: str) -> bool:
    """True if `module` is `outer` or inside it (whole components)."""
    return module.startswith(outer) and (len(module) == len(outer) or module[len(outer)] == ".")


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


PlannedPair = tuple[str, tuple[str, ...], tuple[Op, ...]]

# Hints that are choices rather than pairings (target side starts with "@").
FLATTEN_HINT = "@flatten"
# For models that transpose to NCHW before flattening (seed 003's own JModel does), where the
# regrouping would be wrong and nothing in the weights shows it.
NO_FLATTEN_HINT = "@noflatten"
TRANSPOSE_HINT = "@transpose"
_CHOICES = (FLATTEN_HINT, NO_FLATTEN_HINT, TRANSPOSE_HINT)
_ORIENTATIONS = (((TRANSPOSE_HINT, "yes"),), ((TRANSPOSE_HINT, "no"),))
_FLATTENS = (((FLATTEN_HINT, "nhwc"),), ((FLATTEN_HINT, "nchw"),))


@dataclass
class _Outcome:
    """One matching pass: the planned pairs, or why it failed (typed, for re-checking hints)."""

    pairs: list[PlannedPair]
    result: MatchResult
    problems: list[str] = field(default_factory=list)
    stray: list[Node] = field(default_factory=list)
    bad_hints: list[str] = field(default_factory=list)
    hints_used: set[Hint] = field(default_factory=set)
    # Open decisions, as data (see `MatchError.choices`).
    choices: list[tuple[tuple[Hint, ...], ...]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        r = self.result
        return not (r.conflicts or r.unpaired_targets or self.stray or self.problems)

    def mapping(self) -> dict[str, tuple[str, ...]]:
        return {t: s for t, s, _ in self.pairs}


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
) -> tuple[list[PlannedPair], list[str]]:
    """Pair target tensors with source tensors; returns (pairs with ops, dropped source names).

    Every pairing and op must be justified by evidence (see the module docstring); otherwise
    the whole plan is refused, with every ambiguity listed at once and hints that were checked
    to resolve them. When one-to-one pairing fails, it is retried with fused (qkv, in_proj) and
    stacked (experts) tensors on either side split into virtual parts (`weightbridge.planning.fused`).

    Raises:
        MatchError: ambiguous ties (with hints that resolve them), unpaired tensors (both
            sides, with shapes), pairs no layout rule fits, conflicting evidence, bad hints.
    """
    log = log if log is not None else []
    hints = tuple(hints)
    _check_hints(hints, sources, targets)
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
    log.append(
        f"source layout: {fam[0]}; target layout: {fam[1]}; "
        f"{len(src)} source and {len(tgt)} target tensors ({len(dropped)} buffers dropped)"
    )
    ctx = _Context(fam, hints, log, slice_mismatched)
    outcome = ctx.run(src, tgt, {}, {})
    if not outcome.ok:
        vsrc, sparts = split_fused(src, fam[0] == "pytorch")
        vtgt, tparts = split_fused(tgt, fam[1] == "pytorch")
        if sparts or tparts:
            log.append(
                f"one-to-one pairing failed; retrying with {len(sparts)} source and "
                f"{len(tparts)} target fused/stacked parts split out"
            )
            retry = ctx.run(vsrc, vtgt, sparts, tparts)
            if retry.ok or _closer(retry, outcome):
                outcome = retry
    if outcome.bad_hints:
        raise MatchError("\n".join(outcome.bad_hints))
    if not outcome.ok:
        message = ctx.refusal(src, tgt, outcome)
        if not partial:
            raise MatchError(message, _choices(outcome))
        log.append("partial: left unpaired (they keep their own values):\n" + message)
    return outcome.pairs, dropped


# Tied groups up to this size offer every assignment as an alternative to try by execution
# (4! = 24); larger groups need hints or rules.
_MAX_GROUP_TO_TRY = 4


def _choices(outcome: _Outcome) -> tuple[tuple[tuple[Hint, ...], ...], ...]:
    """The refusal's open decisions: orientation, flatten order, and each small tied group's
    possible assignments (as hints). Groups whose alternatives read the same (every layer's
    pair of norms) are one decision."""
    out = list(outcome.choices)
    for c in outcome.result.conflicts:
        if len(c.targets) > _MAX_GROUP_TO_TRY:
            continue
        alternatives = []
        for perm in itertools.permutations(c.sources):
            alternatives.append(
                tuple(
                    (_hint_text(t, c.targets), _hint_text(s, c.sources))
                    for t, s in list(zip(c.targets, perm, strict=True))[:-1]
                )
            )
        out.append(tuple(alternatives))
    return tuple(dict.fromkeys(out))


def _closer(a: _Outcome, b: _Outcome) -> bool:
    """True if pass `a` got further than `b` (its refusal is the more useful one to show)."""
    left_a = len(a.result.unpaired_targets) + len(a.result.conflicts) + len(a.stray)
    left_b = len(b.result.unpaired_targets) + len(b.result.conflicts) + len(b.stray)
    return left_a < left_b or (left_a == left_b == 0 and bool(a.problems))


def _check_hints(
    hints: Sequence[Hint], sources: Sequence[TensorSpec], targets: Sequence[TensorSpec]
) -> None:
    """A hint that names nothing, or an unknown choice, is an error, never silently ignored."""
    errors: list[str] = []
    for t_sub, s_sub in hints:
        if t_sub.startswith("@"):
            if t_sub not in _CHOICES:
                errors.append(f"unknown hint {t_sub!r}; the choices are {', '.join(_CHOICES)}")
            elif t_sub == TRANSPOSE_HINT and s_sub not in ("yes", "no"):
                errors.append(f"hint {t_sub}={s_sub}: say {t_sub}=yes or {t_sub}=no")
            elif (
                t_sub == FLATTEN_HINT
                and s_sub not in ("nhwc", "nchw")
                and not any(s_sub in t.name for t in targets)
            ):
                errors.append(
                    f"hint {t_sub}={s_sub}: no target tensor name contains {s_sub!r}; give "
                    "nhwc, nchw, or part of the name of the dense layer after the flatten"
                )
            continue
        if not any(t_sub in t.name for t in targets):
            errors.append(f"hint {t_sub}={s_sub}: no target tensor name contains {t_sub!r}")
        if not any(s_sub in s.name for s in sources):
            errors.append(f"hint {t_sub}={s_sub}: no source tensor name contains {s_sub!r}")
    if errors:
        raise MatchError(
            "\n".join(errors) + "\nA hint is TARGET_SUBSTRING=SOURCE_SUBSTRING (API: "
            "hints=[('target part', 'source part')]); check the names with `weightbridge inspect`"
        )


@dataclass
class _Context:
    """What stays the same across the passes of one `match_specs` call."""

    fam: tuple[str, str]
    hints: tuple[Hint, ...]
    log: list[str]
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
    ) -> _Outcome:
        """Decide the 2-D orientation, then match; try both orientations when nothing decides."""
        hints = self.hints if hints is None else hints
        log: list[str] = [] if quiet else self.log
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
            result = MatchResult()
            return _Outcome([], result, problems=[conflict])
        order = (_is_definition_order(src), _is_definition_order(tgt))
        if decided is not None:
            log.append(f"2-D weights are {'' if decided else 'not '}transposed: {reason}")
            return self._once(src_tree, tgt_tree, decided, order, hints, log, sparts, tparts)
        tries = {
            flag: self._once(src_tree, tgt_tree, flag, order, hints, [], sparts, tparts)
            for flag in (False, True)
        }
        ok = [flag for flag, o in tries.items() if o.ok]
        if len(ok) == 1:
            log.append(
                f"2-D weights are {'' if ok[0] else 'not '}transposed: only that orientation "
                "pairs every tensor (shapes alone did not decide)"
            )
            return self._once(src_tree, tgt_tree, ok[0], order, hints, log, sparts, tparts)
        default = (self.fam[0] == "pytorch") != (self.fam[1] == "pytorch")
        if not ok:
            failed = self._once(src_tree, tgt_tree, default, order, hints, log, sparts, tparts)
            if any(
                n.role == "matrix" and len(n.spec.shape) == 2 for n in src_tree.leaves() if n.spec
            ):
                failed.choices.append(_ORIENTATIONS)
                failed.problems.append(
                    "note: nothing shows yet whether the source's 2-D weights are stored "
                    "[out, in] or [in, out]; once the rest pairs, that may need "
                    f"hints=[('{TRANSPOSE_HINT}', 'yes' or 'no')] too"
                )
            return failed
        if sorted(tries[False].pairs) == sorted(tries[True].pairs):
            # No 2-D kernel whose orientation matters: every op is the same either way.
            return self._once(src_tree, tgt_tree, default, order, hints, log, sparts, tparts)
        if all(order) and self.fam[0] == self.fam[1]:
            agree = [flag for flag, o in tries.items() if _follows_order(o.result.pairs)]
            if len(agree) == 1:
                log.append(
                    f"2-D weights are {'' if agree[0] else 'not '}transposed: only that "
                    "orientation pairs kernels in both sides' definition order"
                )
                return self._once(src_tree, tgt_tree, agree[0], order, hints, log, sparts, tparts)
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
        return _Outcome(
            tries[default].pairs, MatchResult(), problems=[problem], choices=[_ORIENTATIONS]
        )

    def _once(
        self,
        src_tree: Node,
        tgt_tree: Node,
        transpose2d: bool,
        order: tuple[bool, bool],
        hints: tuple[Hint, ...],
        log: list[str],
        sparts: dict[str, Part],
        tparts: dict[str, Part],
    ) -> _Outcome:
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
        m = _Matcher(hints, False, False)
        m.descend(src_tree, tgt_tree)
        if m.result.conflicts and all(order) and _orders_agree(m.result.pairs):
            by_order = _Matcher(hints, True, True)
            by_order.descend(src_tree, tgt_tree)
            if _orders_agree(by_order.result.pairs):
                log.append(
                    f"definition order breaks ties: all {len(by_order.result.pairs)} pairs "
                    "come in the same order on both sides"
                )
                m = by_order
        m.pair_leftovers_by_hints()
        outcome = _Outcome([], m.result, bad_hints=m.bad_hints, hints_used=m.hints_used)
        _plan_pairs(outcome, self.fam, transpose2d, order, hints, log, sparts, tparts)
        if self.slice_mismatched:
            outcome.pairs += _slice_mismatched(
                outcome.result,
                *self.fam,
                log,
                (tokens(src_tree.name), tokens(tgt_tree.name)),
            )
        # A source module maps whole or not at all: a module the target lacks entirely (a
        # pooler, a classification head) is left out and reported as unused, but a lone
        # leftover tensor of a module whose other tensors were used (a bias: use_bias differs)
        # is an error; so is one whose module's submodules were used (``query.weight`` left
        # while a ``query.extra_copy.weight`` of the same shape was taken instead).
        result = outcome.result
        used_modules: set[str] = set()
        for s, _ in result.pairs:
            module = _parent(s.path)
            while module and module not in used_modules:
                used_modules.add(module)
                module = _parent(module)
        outcome.stray = [n for n in result.unpaired_sources if _parent(n.path) in used_modules]
        if outcome.ok:
            for n in result.unpaired_sources:
                log.append(f"unused: {n.path} (its whole module has no counterpart in the target)")
        log.append(
            f"paired {len(result.pairs)} tensors by structure; {len(result.conflicts)} "
            f"ambiguous group(s), {len(result.unpaired_targets)} target(s) unpaired"
        )
        return outcome

    def refusal(self, src: list[TensorSpec], tgt: list[TensorSpec], outcome: _Outcome) -> str:
        """The refusal message: summary, at most ~20 detail lines, then checked hints."""
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
            detail += [f"    OUT {_describe(leaf)}" for t in c.targets for leaf in t.leaves()][:6]
            detail += [f"    IN  {_describe(leaf)}" for s in c.sources for leaf in s.leaves()][:6]
            if i < _HINTS_CHECKED:
                fixes.append(self._checked_hint(src, tgt, c))
        if r.unpaired_targets or r.unpaired_sources:
            detail.append("  no counterpart with a matching role and size:")
            detail += [f"    OUT {_describe(n)} [{n.role}]" for n in r.unpaired_targets]
            detail += [f"    IN  {_describe(n)} [{n.role}]" for n in r.unpaired_sources]
            bias = _bias_mismatch(r)
            if bias:
                detail.append(f"  {bias}")
            fixes += self._tied_copies(src, tgt, r)
        if outcome.stray:
            detail.append("  left over from modules whose other tensors were used:")
            detail += [f"    IN  {_describe(n)} [{n.role}]" for n in outcome.stray]
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
        self, src: list[TensorSpec], tgt: list[TensorSpec], r: MatchResult
    ) -> list[str]:
        """A target with several same-shaped unpaired sources: in a file, tied tensors (T5's
        ``shared`` and ``encoder.embed_tokens``) are stored as copies, and any of them may be
        the one. Name the hint that picks one (checked), since values are not read here."""
        out: list[str] = []
        for t in r.unpaired_targets[:_HINTS_CHECKED]:
            same = [s for s in r.unpaired_sources if _relaxed(s) == _relaxed(t)]
            if len(same) < 2:
                continue
            best = max(same, key=lambda s: (_similarity(s, t), -s.order))
            hint = (
                _unique_tail(real_path(t), [x.name for x in tgt]),
                _unique_tail(real_path(best), [x.name for x in src]),
            )
            again = self.run(src, tgt, {}, {}, hints=(*self.hints, hint), quiet=True)
            if any(u.path == t.path for u in again.result.unpaired_targets) or again.bad_hints:
                continue
            names = ", ".join(repr(real_path(s)) for s in same[:4])
            out.append(
                f"{real_path(t)!r} has {len(same)} candidates of its shape ({names}), maybe "
                f"tied copies of one tensor; to take {real_path(best)!r}: hints={[hint]!r} "
                f"(CLI: --hint {hint[0]}={hint[1]}) (checked: it pairs this tensor)"
            )
        return out

    def _checked_hint(self, src: list[TensorSpec], tgt: list[TensorSpec], c: Conflict) -> str:
        """Hints for a conflict, printed only if re-planning with them removes it. They name a
        likely pairing, for the user to confirm, not a decision: by word overlap (which the
        matcher itself does not trust) when that gives one, else by definition order."""
        ts = sorted(c.targets, key=lambda n: n.order)
        for pairing in (
            _likely_by_words(c.sources, ts),
            list(zip(ts, sorted(c.sources, key=lambda n: n.order), strict=True)),
        ):
            if pairing is None:
                continue
            extra = tuple(
                (_hint_text(t, c.targets), _hint_text(s, c.sources)) for t, s in pairing[:-1]
            )
            again = self.run(src, tgt, {}, {}, hints=(*self.hints, *extra), quiet=True)
            group = {t.path for t in c.targets}
            still = any({t.path for t in k.targets} == group for k in again.result.conflicts)
            if still or again.bad_hints:
                continue
            pairs = ", ".join(f"{real_path(t)!r} is {real_path(s)!r}" for t, s in pairing)
            cli = " ".join(f"--hint {a}={b}" for a, b in extra)
            return (
                f"if {pairs}: hints={list(extra)!r} (CLI: {cli}) (checked: it resolves this group)"
            )
        return (
            f"no hint found that separates {real_path(ts[0])!r} from its look-alikes; "
            "pair them with a rules file"
        )


def _likely_by_words(ss: list[Node], ts: list[Node]) -> list[tuple[Node, Node]] | None:
    """The assignment with the most word overlap (Jaccard), if one is strictly best: a guess
    to show in a refusal, never used to decide. Small groups only (it tries permutations)."""
    if len(ts) > 6:
        return None
    best: list[tuple[float, tuple[Node, ...]]] = []
    for perm in itertools.permutations(ss):
        total = sum(_similarity(s, t) for s, t in zip(perm, ts, strict=True))
        best.append((total, perm))
    best.sort(key=lambda x: -x[0])
    if len(best) > 1 and best[0][0] - best[1][0] < 1e-9:
        return None
    return list(zip(ts, best[0][1], strict=True))


# Fewer certain pairs than this say too little about whether two orders agree.
_MIN_PAIRS_FOR_ORDER = 8


def _orders_agree(pairs: list[tuple[Node, Node]]) -> bool:
    """True if the pairs, sorted by source order, are sorted by target order too."""
    if len(pairs) < _MIN_PAIRS_FOR_ORDER:
        return False
    ordered = sorted(pairs, key=lambda p: p[0].order)
    return all(a[1].order < b[1].order for a, b in itertools.pairwise(ordered))


def _follows_order(pairs: list[tuple[Node, Node]]) -> bool:
    """True if the paired 2-D kernels come in the same definition order on both sides."""
    mats = sorted(
        (s.order, t.order)
        for s, t in pairs
        if s.role == "matrix" and s.spec is not None and len(s.spec.shape) == 2
    )
    return all(a[1] < b[1] for a, b in itertools.pairwise(mats))


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


def _unique_tail(name: str, names: Sequence[str]) -> str:
    """The shortest tail of `name`, on name boundaries, found in no other of `names`."""
    parts = re.split(r"([./])", name)
    for i in range(len(parts) - 1, -1, -2):
        tail = "".join(parts[i:])
        if sum(tail in other for other in names) <= 1:
            return tail
    return name


def _hint_text(node: Node, group: Sequence[Node]) -> str:
    """The shortest tail of `node.path`, on name boundaries, that names it alone in `group`."""
    parts = re.split(r"([./])", real_path(node))
    for i in range(len(parts) - 1, -1, -2):
        tail = "".join(parts[i:])
        if _hint_hits(tail, group) == [node]:
            return tail
    return real_path(node)


def _side_orientation(tree: Node, family: str) -> tuple[str | None, str]:
    """How one side stores 2-D kernels, from modules whose bias proves it: a Linear's bias has
    its output size. Returns ("out_in" | "in_out" | "mixed" | None, evidence)."""
    votes: dict[str, list[str]] = {"out_in": [], "in_out": []}
    for node in _all_internal(tree):
        if len(node.children) < 2:
            continue  # no room for a weight and a bias
        leaves = [c for c in node.children.values() if c.spec is not None]
        mats = [
            c
            for c in leaves
            if c.role == "matrix" and len(c.spec.shape) == 2 and not c.embedding  # type: ignore[union-attr]
        ]
        biases = [c for c in leaves if c.role == "bias" and len(c.spec.shape) == 1]  # type: ignore[union-attr]
        if len(mats) != 1 or len(biases) != 1:
            continue
        (a, b), n = mats[0].spec.shape, biases[0].spec.shape[0]  # type: ignore[union-attr]
        if a != b and n in (a, b):
            votes["out_in" if n == a else "in_out"].append(mats[0].path)
    if votes["out_in"] and votes["in_out"]:
        return "mixed", (
            f"{votes['out_in'][0]} is stored [out, in] but {votes['in_out'][0]} [in, out] "
            "(by their biases)"
        )
    for k, v in votes.items():
        if v:
            return (
                k,
                f"{len(v)} biased 2-D weight(s) such as {v[0]} are stored {k.replace('_', ', ')}",
            )
    if family != "pytorch" and family != "numpy":
        # Flax, Haiku, Keras and TF store every Dense kernel [in, out]; only torch-named
        # checkpoints come both ways (nn.Linear vs GPT-2's Conv1D and ports from JAX).
        return "in_out", f"{family} stores Dense kernels [in, out]"
    return None, ""


def decide_transpose(
    src_tree: Node, tgt_tree: Node, fam: tuple[str, str]
) -> tuple[bool | None, str, str]:
    """Whether the source's 2-D kernels are transposed into the target: a property of the whole
    checkpoint, never of one tensor. Returns (decision or None, evidence, conflict message).

    Evidence: each side's orientation proven by biases (`_side_orientation`), and the
    non-square kernel shapes, which fit the target's either as they are or transposed.
    Evidence that disagrees is a conflict; no evidence is None (the caller then tries both).
    """
    o_s, why_s = _side_orientation(src_tree, fam[0])
    o_t, why_t = _side_orientation(tgt_tree, fam[1])
    for o, why, side in ((o_s, why_s, "source"), (o_t, why_t, "target")):
        if o == "mixed":
            return (
                None,
                "",
                (
                    f"the {side} stores some 2-D weights [out, in] and others [in, out]: {why}; "
                    "convert it with a rules file, or pair the two kinds in separate conversions"
                ),
            )
    by_bias = (o_s != o_t) if o_s and o_t else None

    def shapes(tree: Node) -> Counter[tuple[int, ...]]:
        return Counter(
            n.spec.shape
            for n in tree.leaves()
            if n.spec is not None
            and n.role == "matrix"
            and len(n.spec.shape) == 2
            and n.spec.shape[0] != n.spec.shape[1]
            and not n.embedding
        )

    s_shapes, t_shapes = shapes(src_tree), shapes(tgt_tree)
    kept = sum((s_shapes & t_shapes).values())
    flipped = sum((Counter({k[::-1]: v for k, v in s_shapes.items()}) & t_shapes).values())
    by_shape = None if kept == flipped else flipped > kept
    shape_why = f"{max(kept, flipped)} non-square 2-D weight(s) fit the target only that way"
    if by_bias is not None and by_shape is not None and by_bias != by_shape:
        return (
            None,
            "",
            (
                f"conflicting evidence about 2-D weight orientation: biases say "
                f"{'transpose' if by_bias else 'keep'} ({why_s}; {why_t}), but the non-square "
                f"shapes fit the target only {'transposed' if by_shape else 'as they are'}; pass "
                f"hints=[('{TRANSPOSE_HINT}', 'yes' or 'no')] once you know which is right"
            ),
        )
    if by_bias is not None:
        return by_bias, f"{why_s}; {why_t}", ""
    if by_shape is not None:
        return by_shape, shape_why, ""
    return None, "", ""


def _plan_pairs(
    outcome: _Outcome,
    fam: tuple[str, str],
    transpose2d: bool,
    orders: tuple[bool, bool],
    hints: Sequence[Hint],
    log: list[str],
    sparts: dict[str, Part],
    tparts: dict[str, Part],
) -> None:
    """Ops for every pair, from the layout rules; fused parts joined back into their tensors."""
    src_family, tgt_family = fam
    result = outcome.result
    try:
        flatten = _flatten_pair(result.pairs, src_family, tgt_family, orders, hints, log)
    except MatchError as e:
        outcome.problems.append(str(e))
        outcome.choices += e.choices
        return
    origin_shape = {}
    groups: dict[str, dict[int, tuple[str, tuple[Op, ...]]]] = defaultdict(dict)
    # fit_ops reads names only to tell embeddings (of matrices); with that flag, its answer is
    # a function of shapes, shared by every pair alike (every expert of every layer).
    fitted: dict[tuple[object, ...], tuple[Op, ...] | None] = {}
    for s, t in result.pairs:
        assert s.spec is not None and t.spec is not None
        channels = flatten[1] if flatten and flatten[0] is s else None
        embedding = s.role == "matrix" and (
            s.embedding or (t.embedding if t.role == "matrix" else is_embedding(t.path))
        )
        key = (s.spec.shape, t.spec.shape, s.role, embedding, channels)
        if key in fitted:
            ops = fitted[key]
        else:
            ops = fitted[key] = fit_ops(
                s.spec,
                t.spec,
                s.role,
                src_family,
                tgt_family,
                transpose2d=transpose2d,
                flatten_channels=channels,
                embedding=embedding,
            )
        if ops is None:
            outcome.problems.append(
                f"paired {s.spec.name} {s.spec.shape} with {t.spec.name} {t.spec.shape} "
                "by structure, but no layout rule turns one into the other"
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
            outcome.pairs.append((t.spec.name, (sname,), ops))
    for origin, members in groups.items():
        tp = origin_shape[origin]
        if len(members) != tp.count:
            outcome.problems.append(
                f"{origin}: only {len(members)} of its {tp.count} parts found sources"
            )
            continue
        ordered = [members[i] for i in range(tp.count)]
        part_shape = next(
            t.spec.shape
            for _, t in result.pairs
            if t.spec and t.spec.name in tparts and tparts[t.spec.name].origin == origin
        )
        joined = join_ops(tp, [ops for _, ops in ordered], part_shape)
        if joined is None:
            outcome.problems.append(
                f"{origin}: its parts need different layout changes; join them with a rule"
            )
            continue
        outcome.pairs.append((origin, tuple(name for name, _ in ordered), joined))
        log.append(f"{origin}: {'stacked' if tp.stacked else 'concatenated'} from {tp.count} parts")


def _parent(path: str) -> str:
    """`path` up to its last separator ("" without one)."""
    cut = max(path.rfind("."), path.rfind("/"))
    return path[:cut] if cut >= 0 else ""


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
    from weightbridge.planning.layouts import layout_permutation

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


def _flatten_pair(
    pairs: list[tuple[Node, Node]],
    src_family: str,
    tgt_family: str,
    orders: tuple[bool, bool],
    hints: Sequence[Hint],
    log: list[str],
) -> tuple[Node, int] | None:
    """The dense layer right after a conv stack whose input is a flattened feature map, if any.

    torch flattens NCHW; a Flax/Keras model flattens NHWC directly, or transposes to NCHW first
    (seed 003's own example does). Which one cannot be read from weights, so the regroup is
    never guessed: it needs positive evidence of a flatten (the dense layer's fan-in is the last
    conv's C channels times H*W > 1, and no per-channel tensor of that fan-in sits between them,
    which would mean global pooling) and then an explicit choice: ``("@flatten", "nhwc")``
    regroups, ``("@flatten", "nchw")`` or ``("@noflatten", "")`` does not; ``("@flatten",
    "<target name part>")`` also names the dense layer when order does not tell.

    Raises:
        MatchError: a flatten is evidenced and no choice was made, or several dense layers
            could follow it and nothing says which.
    """
    if (src_family == "pytorch") == (tgt_family == "pytorch"):
        return None
    choices = [h[1] for h in hints if h[0] == FLATTEN_HINT]
    if any(h[0] == NO_FLATTEN_HINT for h in hints) or "nchw" in choices:
        return None
    named = [c for c in choices if c not in ("nhwc", "nchw")]
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
        and not s.embedding
    ]
    hinted = [p for p in dense for h in named if h in p[1].path]
    chosen: tuple[Node, Node] | None
    if hinted:
        chosen = hinted[0]
    elif src_ordered or tgt_ordered:
        last = max(key(c) for c in convs)
        after = sorted((p for p in dense if key(p) > last), key=key)
        chosen = after[0] if after else None
    else:
        fits = [p for p in dense if fan_in(p[0]) % channels == 0 and fan_in(p[0]) // channels > 1]
        if len(fits) > 1:
            names = [t.path for _, t in fits]
            raise MatchError(
                f"cannot tell which dense layer follows the flatten after the conv stack "
                f"({channels} channels): any of {names[:4]} could, and neither side keeps "
                "definition order. Name it with hints=[('@flatten', '<part of its target name>')] "
                "(CLI: --hint @flatten=NAME), or say there is none with ('@flatten', 'nchw')"
            )
        chosen = fits[0] if fits else None
    if chosen is None:
        return None
    n_in = fan_in(chosen[0])
    if n_in % channels or n_in // channels < 2:
        return None
    if not hinted and (src_ordered or tgt_ordered):
        # A per-channel tensor with the dense layer's fan-in between the last conv and it (a
        # final BatchNorm: DenseNet's norm5) shows the features are pooled channels, not a
        # flattened map whose size merely divides by the last conv's channels.
        lo, hi = max(key(c) for c in convs), key(chosen)
        pooled = [
            p
            for p in pairs
            if lo < key(p) < hi and p[0].spec is not None and p[0].spec.shape == (n_in,)
        ]
        if pooled:
            log.append(
                f"{chosen[1].path}: follows pooled features ({pooled[0][0].path} has its "
                f"{n_in} channels), not a flatten; no regroup"
            )
            return None
    if not hinted and "nhwc" not in choices:
        raise MatchError(
            f"{chosen[1].path} takes {n_in} = {channels} channels x {n_in // channels} "
            "positions from the conv stack through a flatten. Whether the "
            f"{'target' if torch_side else 'source'} model flattens its NHWC feature map directly "
            "or transposes it to NCHW first cannot be read from the weights. Say which: "
            "hints=[('@flatten', 'nhwc')] (flattens NHWC directly: its input axis is regrouped) "
            "or hints=[('@flatten', 'nchw')] (transposes first: no regroup); CLI: --hint "
            "@flatten=nhwc or --hint @flatten=nchw",
            (_FLATTENS,),
        )
    log.append(
        f"{chosen[1].path}: follows a conv stack through a flatten; regrouping its input from "
        f"{'NCHW' if torch_side else 'NHWC'} to {'NHWC' if torch_side else 'NCHW'} order "
        f"({channels} channels)"
    )
    return chosen[0], channels


def _describe(n: Node) -> str:
    assert n.spec is not None
    return f"{n.spec.name} {n.spec.shape}"


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
