"""JAX/Flax adapter: specs from pytrees (``jax.ShapeDtypeStruct`` leaves too), nested dicts back.

Pytree paths become names joined with ``/`` (``params/Dense_0/kernel``), the convention of
orbax and of Flax's own ``flatten_dict(sep="/")``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from weightbridge import dtypes
from weightbridge.spec import CheckpointSpec, TensorSpec

SEP = "/"


def flatten(tree: Any) -> dict[str, Any]:
    """``{"a/b": leaf}`` for every leaf of a pytree, in pytree order."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[SEP.join(_key(k) for k in path)] = leaf
    return out


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def spec_from_pytree(tree: Any) -> CheckpointSpec:
    """Specs of a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``)."""
    return CheckpointSpec.of(
        TensorSpec(name, tuple(leaf.shape), dtypes.from_numpy(np.dtype(leaf.dtype)))
        for name, leaf in flatten(tree).items()
    )


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts from ``{"a/b": value}``."""
    root: dict[str, Any] = {}
    for name, value in flat.items():
        node = root
        *parents, leaf = name.split(SEP)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return root
