"""`adapt(theirs, mine)`: the in-memory call of the original weightbridge, drop-in.

Returns mine's structure (nesting, names, shapes, dtypes, leaf types) filled with their values,
planned by the same matcher that drives `weightbridge convert --like`. Frameworks are detected
from the objects without importing anything the caller has not imported.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge import io as wio
from weightbridge.errors import PlanError, SpecError
from weightbridge.match import Matcher
from weightbridge.plan import Plan
from weightbridge.planner import MINE, make_plan
from weightbridge.spec import CheckpointSpec, TensorSpec
from weightbridge.transform import compute

Hint = tuple[str, str]


def adapt(
    theirs: Any,
    mine: Any,
    *,
    in_format: str | None = None,
    out_format: str | None = None,
    hints: Sequence[Hint] = (),
    cache: str | os.PathLike[str] | None = None,
    verbose: bool = False,
    rules: Mapping[str, Any] | None = None,
    partial: bool = False,
    slice_mismatched: bool = False,
) -> Any:
    """Mine's structure with their values.

    Args:
        theirs: pretrained weights: a checkpoint path, a torch module/state dict, a jax/flax
            pytree or variables dict, or nested dicts of numpy/tf arrays.
        mine: the freshly initialised weights, in any of those forms; leaves may be metadata
            only (torch meta tensors, ``jax.ShapeDtypeStruct``).
        in_format, out_format: ``pytorch``, ``tensorflow``, ``keras``, ``flax``, ``haiku`` (guessed
            from names when not given).
        hints: ``[("reduce", "conv1")]``: unique substrings (target first) that pair tensors the
            matcher found ambiguous; its error says which hint resolves each conflict.
        cache: a plan file saved on first use and reused while both sides' specs match. A
            relative path is taken relative to the directory of the calling module.
        verbose: print the matching steps and the final mapping table.
        rules: ``{target_regex: Transform}`` applied before matching (`weightbridge.rules`);
            here, in memory, ``value_fn`` works too.
        partial: load what fits and keep mine's own values for the rest (seed: torch_liberator).
        slice_mismatched: with `partial`, copy the leading block of same-named tensors whose
            shapes differ (a 1000-class head into a 10-class one).

    Raises:
        MatchError: tensors could not be paired without guessing (the message lists them).

    >>> import numpy as np
    >>> theirs = {"fc.weight": np.arange(6.0).reshape(3, 2), "fc.bias": np.zeros(3)}
    >>> mine = {"Dense_0": {"kernel": np.zeros((2, 3)), "bias": np.ones(3)}}
    >>> adapt(theirs, mine)["Dense_0"]["kernel"].tolist()
    [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    """
    src_leaves, src_close = _source_leaves(theirs)
    try:
        tgt_leaves, rebuild = _target_leaves(mine)
        src_spec = CheckpointSpec.of(_spec(k, v) for k, v in src_leaves.items())
        tgt_spec = CheckpointSpec.of(_spec(k, v) for k, v in tgt_leaves.items())
        cache_path = _cache_path(cache) if cache is not None else None
        plan = _cached_plan(cache_path, src_spec, tgt_spec)
        log: list[str] = []
        if plan is None:
            matcher = Matcher(
                in_format,
                out_format,
                tuple(hints),
                log,
                partial=partial,
                slice_mismatched=slice_mismatched,
            )
            plan = make_plan(src_spec, tgt_spec, matcher=matcher, rules=rules, partial=partial)
            if cache_path:
                plan.save(cache_path)
        elif verbose:
            log.append(f"reused the plan in {cache_path}")
        if verbose:
            print("\n".join(log), file=sys.stderr)
            print(plan.explain(), file=sys.stderr)
        if partial and verbose:
            print(plan.summary(), file=sys.stderr)
        values: dict[str, Any] = {}
        for step in plan.steps:
            if step.sources[0].startswith(MINE):
                continue  # kept: the rebuilt structure keeps mine's own leaf
            arrays = [_to_numpy(src_leaves[s]) for s in step.sources]
            values[step.target.name] = compute(arrays, step.ops, step.target)
        return rebuild(values)
    finally:
        src_close()


def _cache_path(cache: str | os.PathLike[str]) -> str:
    path = os.fspath(cache)
    if os.path.isabs(path):
        return path
    # Relative to the module that called adapt(), as the original weightbridge documents.
    here = os.path.dirname(os.path.abspath(__file__))
    for frame in inspect.stack()[1:]:
        caller = os.path.abspath(frame.filename)
        if os.path.dirname(caller) != here and not frame.filename.startswith("<"):
            return os.path.join(os.path.dirname(caller), path)
    return os.path.abspath(path)


def _cached_plan(path: str | None, src: CheckpointSpec, tgt: CheckpointSpec) -> Plan | None:
    if not path or not os.path.exists(path):
        return None
    plan = Plan.load(path)
    if plan.source_fingerprint != src.fingerprint() or plan.target_fingerprint != tgt.fingerprint():
        return None  # specs changed: plan again (and overwrite the cache)
    try:
        plan.validate(src, target=tgt)
    except PlanError:
        return None
    return plan


def _spec(name: str, leaf: Any) -> TensorSpec:
    dtype = leaf.dtype
    if "torch" in sys.modules:
        import torch

        if isinstance(dtype, torch.dtype):
            return TensorSpec(name, tuple(leaf.shape), str(dtype).removeprefix("torch."))
    try:
        return TensorSpec(
            name,
            tuple(leaf.shape),
            dtypes.from_numpy(np.dtype(getattr(dtype, "as_numpy_dtype", dtype))),
        )
    except TypeError as e:
        raise SpecError(f"leaf {name!r}: cannot read its dtype {dtype!r}") from e


def _to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, np.ndarray):
        return leaf
    if "torch" in sys.modules:
        import torch

        if isinstance(leaf, torch.Tensor):
            from weightbridge.frameworks.torch import to_numpy

            return to_numpy(leaf)
    if hasattr(leaf, "numpy") and callable(leaf.numpy):  # tf tensors and variables
        return np.asarray(leaf.numpy())
    return np.asarray(leaf)


def _source_leaves(theirs: Any) -> tuple[dict[str, Any], Callable[[], None]]:
    if isinstance(theirs, (str, os.PathLike)):
        reader = wio.open_reader(theirs)
        return {name: _Lazy(reader, name) for name in reader.specs().names}, reader.close
    leaves, _ = _target_leaves(theirs)
    return leaves, lambda: None


class _Lazy:
    """A source tensor read (memory-mapped) only when a step needs it."""

    def __init__(self, reader: Any, name: str) -> None:
        spec = reader.specs()[name]
        self.reader, self.name = reader, name
        self.shape, self.dtype = spec.shape, dtypes.to_numpy(spec.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.reader.read(self.name), dtype=dtype)


def _target_leaves(mine: Any) -> tuple[dict[str, Any], Callable[[dict[str, Any]], Any]]:
    """Flat {name: leaf} of any supported structure, and a function that rebuilds it."""
    if "torch" in sys.modules:
        import torch

        if isinstance(mine, torch.nn.Module):
            mine = mine.state_dict()
        first = _first_leaf(mine)
        if isinstance(mine, Mapping) and isinstance(first, torch.Tensor):
            from weightbridge.frameworks.torch import from_numpy

            flat = dict(mine)

            def rebuild_torch(values: dict[str, Any]) -> Any:
                out: Any = type(mine)()  # dict or OrderedDict, as the caller had it
                for k, v in flat.items():
                    out[k] = from_numpy(values[k], v) if k in values else v
                return out

            return flat, rebuild_torch
    if "jax" in sys.modules:
        import jax

        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(mine)
        if leaves_with_path and isinstance(
            leaves_with_path[0][1], (jax.Array, jax.ShapeDtypeStruct)
        ):
            from weightbridge.frameworks.jax import flatten

            flat = flatten(mine)
            names = list(flat)

            def rebuild_jax(values: dict[str, Any]) -> Any:
                import jax.numpy as jnp

                new = [jnp.asarray(values[n]) if n in values else flat[n] for n in names]
                return jax.tree_util.tree_unflatten(treedef, new)

            return flat, rebuild_jax
    if isinstance(mine, Mapping):
        flat = _flatten(mine)

        def rebuild_dict(values: dict[str, Any]) -> Any:
            return _unflatten(mine, values)

        return flat, rebuild_dict
    raise SpecError(
        f"cannot adapt into a {type(mine).__name__}; pass a torch module/state dict, a jax "
        "pytree or nested dicts of arrays"
    )


def _first_leaf(obj: Any) -> Any:
    while isinstance(obj, Mapping) and obj:
        obj = next(iter(obj.values()))
    return obj


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, name))
        else:
            out[name] = v
    return out


def _unflatten(like: Mapping[str, Any], values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in like.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out[k] = (
            _unflatten(v, values, name) if isinstance(v, Mapping) else _like(values.get(name, v), v)
        )
    return out


def _like(value: Any, template: Any) -> Any:
    """Return `value` as the same kind of array as `template` (numpy stays numpy)."""
    if isinstance(template, np.ndarray) or not hasattr(template, "shape"):
        return value
    if hasattr(template, "numpy") and "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf.convert_to_tensor(value)
    return value
