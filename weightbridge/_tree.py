"""Nested dicts <-> flat ``"a/b"`` names: the one flatten/unflatten every module uses.

Flax, haiku, orbax and Keras name a weight by its path of dict keys; weightbridge names it by
those keys joined with ``/``. Only mappings are walked (lists and tuples are leaves), and an
empty mapping has no leaves, so it disappears. PyTorch pickles have their own dotted naming
(`weightbridge.io._pickle.flatten`) and jax pytrees theirs (`weightbridge.frameworks.jax`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SEP = "/"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a/b": leaf}`` for every leaf of nested mappings, in insertion order.

    A `tree` that is not a mapping is one leaf named `prefix`.

    >>> flatten({"params": {"dense": {"kernel": 1, "bias": 2}}, "step": 3})
    {'params/dense/kernel': 1, 'params/dense/bias': 2, 'step': 3}
    """
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{SEP}{key}" if prefix else str(key)))
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from ``{"a/b": value}`` (the inverse of `flatten` for non-empty mappings).

    >>> unflatten({"params/dense/kernel": 1, "params/dense/bias": 2, "step": 3})
    {'params': {'dense': {'kernel': 1, 'bias': 2}}, 'step': 3}
    """
    root: dict[str, Any] = {}
    for name, value in flat.items():
        node = root
        *parents, leaf = name.split(SEP)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root


def unflatten_like(flat: Mapping[str, Any], like: Any, prefix: str = "") -> Any:
    """The values of `flat` in the nesting of `like` (a tree with the same names).

    >>> unflatten_like({"a/b": 1, "c": 2}, {"c": None, "a": {"b": None}})
    {'c': 2, 'a': {'b': 1}}
    """
    if not isinstance(like, Mapping):
        return flat[prefix]
    return {
        key: unflatten_like(flat, value, f"{prefix}{SEP}{key}" if prefix else str(key))
        for key, value in like.items()
    }
