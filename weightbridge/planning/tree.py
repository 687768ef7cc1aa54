"""Module trees: one side's tensor names as a tree of modules, with roles and signatures.

Name components are split on ``.`` and ``/``; Flax collections, Haiku ``~`` and Keras ``:0``
are removed, and single-child chains (``module.``, ``backbone.0.body.``) collapsed. Every leaf
gets a *role* (matrix, scale, bias, mean, var, param) and an *oriented shape* (its shape as the
other side would hold it), and every subtree a *signature*: the multiset of its leaves' roles
and sizes, as a small int, which does not change with axis order or framework.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from weightbridge.planning.layouts import is_embedding, layout_permutation, leaf_role
from weightbridge.spec import TensorSpec


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
    key: tuple[int, ...] = ()  # oriented shape, see oriented_shape
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
        siblings = {c.name: c.spec.shape for c in node.children.values() if c.spec is not None}
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
            shape_key = oriented[alike] = oriented_shape(child, family, into, transpose2d)
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
            child.key = oriented_shape(child, family, into, transpose2d)


def all_internal(node: Node) -> list[Node]:
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


def oriented_shape(
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


def strict_key(leaf: Node) -> tuple[str, tuple[int, ...]]:
    return leaf.role, leaf.key


def loose_key(leaf: Node) -> tuple[str, int]:
    """Last resort: weights of any rank pair by size alone (``pos_embed`` [1, N, D] as a bare
    parameter vs. a position table [N, D]; a flattened (64,) ``w`` vs. an (8, 8) kernel).
    Ties still need names, order or hints, as everywhere."""
    assert leaf.spec is not None
    loose = leaf.role in ("param", "matrix", "scale")
    return ("weight" if loose else leaf.role), leaf.spec.numel


def relaxed_key(leaf: Node) -> tuple[str, int]:
    assert leaf.spec is not None
    return leaf.role, leaf.spec.numel


class _Signer:
    """Signatures of one kind (strict or relaxed) as small ints, shared by the two trees of a
    matching pass: equal multisets of leaf keys get equal ids, so grouping and the `hidden`
    test of `pairing` compare ints. Sibling modules repeat (every expert of every layer), so a
    node's id is looked up by its children's ids, and multisets are merged only for a new
    combination."""

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
            key = oriented_shape(c, *self.orientation)
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


def inner_signatures(node: Node, sig_of: Callable[[Node], int] = signature) -> frozenset[int]:
    """Signatures of every subtree strictly inside `node` (of the kind `sig_of` gives)."""
    return node.inner if sig_of is signature else node.rinner


def leaf_count(node: Node) -> int:
    return node.size


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
