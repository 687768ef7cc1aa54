"""JAX/Flax adapter: specs from pytrees (``jax.ShapeDtypeStruct`` leaves too), nested dicts back.

Pytree paths become names joined with ``/`` (``params/Dense_0/kernel``), the convention of
orbax and of Flax's own ``flatten_dict(sep="/")``. A box's trailing ``.value`` attribute (a Flax
NNX ``nnx.Variable`` in an ``nnx.State``, a Linen ``nn.Partitioned``) is not part of the name:
``nnx.state(model)`` names its kernel ``dense/kernel``, not ``dense/kernel/value``.

Flax itself is never imported here: NNX objects are recognised only when ``flax.nnx`` is
already in ``sys.modules`` (an object cannot be an ``nnx.State`` otherwise).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from weightbridge import dtypes
from weightbridge._tree import SEP
from weightbridge._tree import unflatten as unflatten  # the nested dicts flax takes
from weightbridge.spec import CheckpointSpec, TensorSpec


def flatten(tree: Any) -> dict[str, Any]:
    """``{"a/b": leaf}`` for every leaf of a pytree, in pytree order."""
    names, leaves, _, _ = flatten_tree(tree)
    return dict(zip(names, leaves, strict=True))


def flatten_tree(tree: Any) -> tuple[list[str], list[Any], list[str | None], Any]:
    """Names, leaves, why each leaf is not a weight (None when it is one) and the treedef.

    Not weights: the random-number state of an NNX model (``nnx.RngState``: the stream's key
    and counter that ``nnx.Rngs`` and ``nnx.Dropout`` keep) and jax PRNG key arrays.
    `jax.tree_util.tree_unflatten(treedef, leaves)` rebuilds the same structure (an
    ``nnx.State`` stays an ``nnx.State`` of the same variable types).
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    variables = _variables(tree)
    raw = [_join(path) for path, _ in with_path]
    names: list[str] = []
    why: list[str | None] = []
    for (path, leaf), full in zip(with_path, raw, strict=True):
        boxed = bool(path) and _is_value_attr(path[-1])
        name = _join(path[:-1]) if boxed else full
        var = variables.get(name) if boxed else None
        names.append(name)
        if var is not None and _is_rng_state(var):
            why.append(f"nnx {type(var).__name__}, random-number state")
        elif _is_prng_key(leaf):
            why.append("a jax random key")
        else:
            why.append(None)
    if len(set(names)) != len(names):
        names = raw  # dropping ".value" made two names equal: keep the full paths
    return names, [leaf for _, leaf in with_path], why, treedef


def unflatten_like(treedef: Any, leaves: list[Any]) -> Any:
    return jax.tree_util.tree_unflatten(treedef, leaves)


def nnx_state_of(obj: Any) -> Any | None:
    """``nnx.state(obj)`` when `obj` is a Flax NNX module (flax already imported), else None."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(obj, nnx.Module):
        return None
    return nnx.state(obj)


def is_array(leaf: Any) -> bool:
    """A jax array or a ``jax.ShapeDtypeStruct`` (PRNG key arrays are not weights)."""
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and not _is_prng_key(leaf)


def as_jax(value: np.ndarray) -> Any:
    return jnp.asarray(value)


def _variables(tree: Any) -> dict[str, Any]:
    """``{name: variable}`` of the NNX variables in `tree` (empty when flax.nnx is not in use)."""
    is_var = _variable_test()
    if is_var is None:
        return {}
    found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]
    return {_join(path): leaf for path, leaf in found if is_var(leaf)}


def _variable_test() -> Callable[[Any], bool] | None:
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return None
    # flax < 0.11 keeps VariableState boxes in a State; newer flax aliases it (with a warning).
    kinds = tuple(k for k in (vars(nnx).get("Variable"), vars(nnx).get("VariableState")) if k)
    return (lambda x: isinstance(x, kinds)) if kinds else None


def _is_rng_state(var: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    rng = vars(nnx).get("RngState") if nnx is not None else None
    if rng is None:
        return False
    if isinstance(var, rng):
        return True
    old_box = vars(nnx).get("VariableState")
    if old_box is None or not isinstance(var, old_box) or old_box is vars(nnx).get("Variable"):
        return False
    kind = getattr(var, "type", None)  # flax < 0.11: a VariableState names its Variable type
    return isinstance(kind, type) and issubclass(kind, rng)


def _is_prng_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    try:
        return dtype is not None and bool(jnp.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def _is_value_attr(key: Any) -> bool:
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def _join(path: Any) -> str:
    return SEP.join(_key(k) for k in path)


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def spec_from_pytree(tree: Any) -> CheckpointSpec:
    """Specs of a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).

    An ``nnx.State``'s random-number state is left out: it is not a weight.
    """
    names, leaves, why, _ = flatten_tree(tree)
    return CheckpointSpec.of(
        TensorSpec(name, tuple(leaf.shape), dtypes.from_numpy(np.dtype(leaf.dtype)))
        for name, leaf, skip in zip(names, leaves, why, strict=True)
        if skip is None
    )
