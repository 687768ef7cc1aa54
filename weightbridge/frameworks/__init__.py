"""Optional adapters between live framework objects and specs/arrays.

Each submodule imports its framework at the top; the core never imports them. `spec_of`
recognises an object's framework without importing anything: an object can only be a
``torch.Tensor`` if ``torch`` is already in ``sys.modules`` (the einops trick).
"""

from __future__ import annotations

import sys
from typing import Any


def framework_of(obj: Any) -> str | None:
    """'torch' or 'jax' when `obj` (or the first leaf of a dict) belongs to that framework."""
    leaf = _first_leaf(obj)
    if "torch" in sys.modules:
        import torch

        if isinstance(obj, torch.nn.Module) or isinstance(leaf, torch.Tensor):
            return "torch"
    if "jax" in sys.modules:
        import jax

        kinds = (jax.Array, jax.ShapeDtypeStruct)
        if isinstance(leaf, kinds):
            return "jax"
        if not isinstance(obj, dict) and any(
            isinstance(x, kinds) for x in jax.tree_util.tree_leaves(obj)
        ):
            return "jax"  # a pytree whose first leaf is not an array (an nnx.State, a tuple)
    return None


def _first_leaf(obj: Any) -> Any:
    while isinstance(obj, dict) and obj:
        obj = next(iter(obj.values()))
    return obj
