"""The matcher's fast paths give what their plain definitions give.

Planning 100k tensors in seconds needs shortcuts (string walks instead of tuple spans, tokens
found per name component, words of tied siblings found from their shared head, Node identity);
each is checked here against the straightforward definition it replaces, on names made of the
characters that make name handling tricky (separators, empty components, ``:0``, digits).
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from weightbridge.planning.evidence import own_words
from weightbridge.planning.names import (
    CAMEL,
    CONCEPT,
    NON_LETTERS,
    ROLE_WORDS,
    SYNONYMS,
    natural_key,
    tokens,
)
from weightbridge.planning.order import is_definition_order
from weightbridge.planning.tree import Node
from weightbridge.spec import TensorSpec

_names = st.text(alphabet="ab1./~:0_Q", min_size=0, max_size=10)


def _tokens_plain(name: str) -> frozenset[str]:
    out: set[str] = set()
    for part in re.split(r"[./~]", name.replace(":0", "")):
        part = CAMEL.sub(r"\1_\2", part).lower()
        concept = CONCEPT.get(part)
        if concept:
            out.add(concept)
        out.update(SYNONYMS.get(w, w) for w in NON_LETTERS.split(part) if w)
    return frozenset(out)


def _definition_order_plain(names: list[str]) -> bool:
    if names == sorted(names) or names == sorted(names, key=natural_key):
        return False
    span: dict[tuple[str, ...], list[int]] = {}
    for i, name in enumerate(names):
        parts = tuple(re.split(r"[./]", name)[:-1])
        for depth in range(1, len(parts) + 1):
            entry = span.setdefault(parts[:depth], [i, i, 0])
            entry[1] = i
            entry[2] += 1
    return all(last - first + 1 == count for first, last, count in span.values())


@settings(max_examples=400, deadline=None)
@given(st.lists(_names, max_size=8))
def test_tokens(names: list[str]) -> None:
    for name in names:
        assert tokens(name) == _tokens_plain(name)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet="ab1./", min_size=1, max_size=8), max_size=8, unique=True))
def test_definition_order(names: list[str]) -> None:
    specs = [TensorSpec(n, (1,), "F32") for n in names]
    assert is_definition_order(specs) == _definition_order_plain(names)


def _own_plain(path: str) -> frozenset[str]:
    """A path's words minus role words, a role word inside a compound last component kept
    (marked ``%``): siblings ``layer_norm_weight`` and ``layer_norm_bias`` differ in it."""
    if ":0" in path:
        return _tokens_plain(path) - ROLE_WORDS
    cut = max(path.rfind("."), path.rfind("/"), path.rfind("~"))
    last = _tokens_plain(path[cut + 1 :])
    if len(last) >= 2:
        last = frozenset(f"%{w}" if w in ROLE_WORDS else w for w in last)
    head = _tokens_plain(path[:cut]) if cut > 0 else frozenset()
    return (head | last) - ROLE_WORDS


@settings(max_examples=400, deadline=None)
@given(_names, st.lists(_names, max_size=4), st.sampled_from(["", ".", "/", "~"]))
def test_own_words(head: str, lasts: list[str], sep: str) -> None:
    nodes = [Node("x", head + sep + last if sep else last, 0) for last in lasts]
    words = [_own_plain(n.path) for n in nodes]
    common = frozenset.intersection(*words) if words else frozenset()
    assert own_words(nodes) == [w - common for w in words]


def test_nodes_compare_by_identity() -> None:
    """A source and a target module may hold the same names and shapes; they stay two."""
    a, b = Node("m", "m", 0), Node("m", "m", 0)
    assert a != b and a in [a] and b not in [a]
