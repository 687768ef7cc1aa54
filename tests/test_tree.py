"""`weightbridge._tree`: the one nested-dict <-> "/"-name flatten/unflatten."""

from __future__ import annotations

import doctest

from weightbridge import _tree


def test_docstring_examples() -> None:
    result = doctest.testmod(_tree)
    assert result.attempted > 0 and result.failed == 0


def test_round_trip_keeps_order_and_treats_sequences_as_leaves() -> None:
    tree = {"b": {"y": [1, 2], "x": (3,)}, "a": 4, 5: {"z": None}}
    flat = _tree.flatten(tree)
    assert flat == {"b/y": [1, 2], "b/x": (3,), "a": 4, "5/z": None}
    assert list(flat) == ["b/y", "b/x", "a", "5/z"]
    assert _tree.unflatten(flat) == {"b": {"y": [1, 2], "x": (3,)}, "a": 4, "5": {"z": None}}
    assert _tree.unflatten_like(flat, {"a": 0, "b": {"x": 0, "y": 0}}) == {
        "a": 4,
        "b": {"x": (3,), "y": [1, 2]},
    }


def test_a_leaf_alone_and_empty_mappings() -> None:
    assert _tree.flatten(7) == {"": 7}
    assert _tree.flatten({"a": {}, "b": 1}) == {"b": 1}  # an empty mapping has no leaves
