"""Evidence from order: whether a checkpoint's tensor order can be a definition order, and
whether two sides' orders agree on the pairs other evidence made.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from weightbridge.planning.names import natural_key
from weightbridge.planning.tree import Node
from weightbridge.spec import TensorSpec


def is_definition_order(specs: Sequence[TensorSpec]) -> bool:
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


# Fewer certain pairs than this say too little about whether two orders agree.
_MIN_PAIRS_FOR_ORDER = 8


def orders_agree(pairs: list[tuple[Node, Node]]) -> bool:
    """True if the pairs, sorted by source order, are sorted by target order too."""
    if len(pairs) < _MIN_PAIRS_FOR_ORDER:
        return False
    ordered = sorted(pairs, key=lambda p: p[0].order)
    return all(a[1].order < b[1].order for a, b in itertools.pairwise(ordered))


def follows_order(pairs: list[tuple[Node, Node]]) -> bool:
    """True if the paired 2-D kernels come in the same definition order on both sides."""
    mats = sorted(
        (s.order, t.order)
        for s, t in pairs
        if s.role == "matrix" and s.spec is not None and len(s.spec.shape) == 2
    )
    return all(a[1] < b[1] for a, b in itertools.pairwise(mats))
