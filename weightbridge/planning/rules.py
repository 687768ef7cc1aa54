"""Explicit rules in the orbax style: target-name regexes mapped to `Transform`s.

A rules mapping is ``{target_regex: Transform}`` (nested dicts join their keys with ``/``).
For every target tensor the first regex that *fully* matches its name decides its value:

* ``Transform(original_key=r"\\1.weight")``: the source tensor whose name is the template with
  the match's groups substituted (``\\1``, ``\\g<name>``); default: the target's own name;
* ``original_key=[...]`` (several templates) with ``ops=[Concat(0)]`` or ``[Stack(0)]``:
  many-to-one (q, k, v -> fused qkv; per-expert -> stacked experts);
* ``split=(axis, index, parts)``: this target is part `index` of `parts` equal parts of the
  source along `axis` (fused qkv -> q, k, v); ``ops=[...]`` adds any other op;
* ``value_fn`` (Python API only): a function of the source array; ``multi_value_fn(key,
  tree)``: a function of the whole source tree (in memory only, see `apply_transformations`);
* ``use_fallback=True``: the value comes from the fallback tree (the target's own value, or
  with ``default_to_original=False`` in `apply_transformations` the original's).

Rules run first; the automatic matcher pairs whatever they leave. Nothing in a rules *file*
is code: files give regexes, templates, ops and splits, never functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightbridge._tree import flatten as _flatten
from weightbridge._tree import unflatten_like as _unflatten
from weightbridge.errors import PlanError, RuleError
from weightbridge.ops import Op, Slice, infer
from weightbridge.spec import CheckpointSpec, TensorSpec


@dataclass(frozen=True)
class Transform:
    """How one target tensor (or every tensor a regex matches) gets its value."""

    original_key: str | Sequence[str] | None = None
    value_fn: Callable[[Any], Any] | None = None
    multi_value_fn: Callable[[str, Any], Any] | None = None
    use_fallback: bool = False
    ops: Sequence[Op] = ()
    split: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Apply:
    """An op that calls a Python function on the whole source tensor (not saved in plan files)."""

    fn: Callable[[Any], Any]
    shape: tuple[int, ...]
    dtype: str
    rule: str
    kind: str = field(default="apply", init=False)

    def out_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return self.shape

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        from weightbridge import dtypes

        out = np.asarray(self.fn(np.asarray(arrays[0])))
        if out.shape != self.shape:
            raise PlanError(
                f"rule '{self.rule}': value_fn returned shape {out.shape}, the target needs {self.shape}"
            )
        return out.astype(dtypes.to_numpy(self.dtype), copy=False)

    def to_json(self) -> dict[str, Any]:
        # Enough to fingerprint the plan in this process; `Plan.to_json` refuses to save it.
        return {"op": self.kind, "rule": self.rule, "fn": f"{self.fn!r}"}


def flatten_rules(rules: Mapping[str, Any], prefix: str = "") -> dict[str, Transform]:
    """``{"a": {"b": T}}`` -> ``{"a/b": T}``, keeping the order rules were given in."""
    out: dict[str, Transform] = {}
    for key, value in rules.items():
        full = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_rules(value, full))
        elif isinstance(value, Transform):
            out[full] = value
        else:
            raise RuleError(f"rule {full!r}: expected a Transform, found {type(value).__name__}")
    return out


@dataclass
class RuleOutcome:
    """What the rules decided: steps for some targets, fallbacks for others."""

    steps: dict[str, tuple[tuple[str, ...], tuple[Any, ...]]] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    by_rule: dict[str, list[str]] = field(default_factory=dict)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RuleError(f"rule {pattern!r}: not a valid regular expression ({e})") from e


def _expand(match: re.Match[str], template: str, rule: str) -> str:
    try:
        return match.expand(template)
    except (re.error, IndexError) as e:
        raise RuleError(
            f"rule {rule!r}: original_key {template!r} refers to a group the regex lacks ({e})"
        ) from e


def resolve(
    rules: Mapping[str, Any],
    source: CheckpointSpec,
    target: CheckpointSpec,
    *,
    require_all_used: bool = True,
) -> RuleOutcome:
    """Apply rules to specs: for each target tensor, the sources and ops its first matching rule gives.

    Raises:
        RuleError: a rule matches no target, names a missing source, or its ops do not fit.
    """
    flat = flatten_rules(rules)
    compiled = [(key, _compile(key), t) for key, t in flat.items()]
    outcome = RuleOutcome(by_rule={key: [] for key in flat})
    for tspec in target:
        for key, regex, transform in compiled:
            m = regex.fullmatch(tspec.name)
            if m is None:
                continue
            outcome.by_rule[key].append(tspec.name)
            if transform.use_fallback:
                outcome.fallback.append(tspec.name)
            elif transform.multi_value_fn is not None:
                raise RuleError(
                    f"rule '{key}': multi_value_fn needs the whole source tree in memory; use "
                    "weightbridge.planning.rules.apply_transformations or adapt(), or express it with ops"
                )
            else:
                outcome.steps[tspec.name] = _step(key, m, transform, source, tspec)
            break
    if require_all_used:
        idle = [k for k, hits in outcome.by_rule.items() if not hits]
        if idle:
            raise RuleError(
                f"rule '{idle[0]}' matches no target tensor (rules match full target names; "
                f"some target names: {target.names[:4]})"
            )
    return outcome


def _step(
    key: str, m: re.Match[str], t: Transform, source: CheckpointSpec, tspec: TensorSpec
) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    templates = (
        [t.original_key]
        if isinstance(t.original_key, str)
        else list(t.original_key or [tspec.name])
    )
    names = tuple(_expand(m, tpl, key) for tpl in templates)
    missing = [n for n in names if n not in source]
    if missing:
        raise RuleError(
            f"rule '{key}' maps target {tspec.name!r} to source {missing[0]!r}, which the source "
            f"checkpoint does not have"
        )
    ops: list[Any] = []
    if t.split is not None:
        axis, index, parts = t.split
        shape = source[names[0]].shape
        if not (-len(shape) <= axis < len(shape)) or shape[axis] % parts or not 0 <= index < parts:
            raise RuleError(
                f"rule '{key}': split {t.split} does not fit source {names[0]!r} of shape {shape} "
                f"(axis {axis} must divide into {parts} equal parts)"
            )
        size = shape[axis] // parts
        ops.append(Slice(axis, index * size, (index + 1) * size))
    ops.extend(t.ops)
    if t.value_fn is not None:
        ops.append(Apply(t.value_fn, tspec.shape, tspec.dtype, key))
    srcs = [source[n] for n in names]
    try:
        infer(
            [o for o in ops if not isinstance(o, Apply)],
            [s.shape for s in srcs],
            srcs[0].dtype,
            where=f"rule '{key}'",
        )
    except PlanError as e:
        raise RuleError(f"{e} (target {tspec.name!r})") from e
    return names, tuple(ops)


# --- the orbax call, in memory ------------------------------------------------------------


def _subtree(tree: Any, key: str) -> Any:
    node = tree
    for part in key.split("/"):
        node = node[part]
    return node


def apply_transformations(
    original_tree: Mapping[str, Any],
    transformations: Mapping[str, Any],
    new_tree: Mapping[str, Any],
    default_to_original: bool = True,
) -> Any:
    """`orbax.checkpoint.apply_transformations`, with the same semantics, on nested dicts.

    Keys only in `new_tree` come from it; keys only in the original are dropped; keys in both
    and not matched by a rule come from the original (or from `new_tree` when
    `default_to_original` is False).

    >>> apply_transformations({"a1": 1, "b5": 2}, {r"([a-z])_([0-9])": Transform(original_key=r"\\1\\2")},
    ...                       {"a_1": ..., "b_5": ...})
    {'a_1': 1, 'b_5': 2}
    """
    original = _flatten(original_tree)
    new = _flatten(new_tree)
    flat_rules = flatten_rules(transformations)
    compiled = [(key, _compile(key), t) for key, t in flat_rules.items()]
    out: dict[str, Any] = {}
    for name, fallback_value in new.items():
        for key, regex, t in compiled:
            m = regex.fullmatch(name)
            if m is None:
                continue
            if t.use_fallback:
                out[name] = (
                    fallback_value if default_to_original else original.get(name, fallback_value)
                )
            elif t.multi_value_fn is not None:
                out[name] = t.multi_value_fn(name, original_tree)
            else:
                templates = (
                    [t.original_key]
                    if isinstance(t.original_key, str)
                    else list(t.original_key or [name])
                )
                src = [_expand(m, tpl, key) for tpl in templates]
                absent = [s for s in src if s not in original and not _is_subtree(original, s)]
                if absent:
                    raise RuleError(
                        f"rule '{key}': target {name!r} maps to {absent[0]!r}, absent from the original tree"
                    )
                values = [original[s] if s in original else _subtree(original_tree, s) for s in src]
                value = values[0]
                for op in t.ops:
                    value = op.apply([np.asarray(v) for v in values])
                    values = [value]
                if t.split is not None:
                    axis, index, parts = t.split
                    value = np.split(np.asarray(value), parts, axis=axis)[index]
                out[name] = t.value_fn(value) if t.value_fn is not None else value
            break
        else:
            if name in original and default_to_original:
                out[name] = original[name]
            else:
                out[name] = fallback_value
    return _unflatten(out, new_tree)


def _is_subtree(flat: Mapping[str, Any], key: str) -> bool:
    return any(k.startswith(key + "/") for k in flat)
