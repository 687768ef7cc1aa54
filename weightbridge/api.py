"""The Python API: inspect, plan, convert and verify checkpoints.

Sources and targets may be given as a checkpoint path, a target spec JSON file, a
`CheckpointSpec`, a dict of arrays, or (when that framework is installed and already imported)
a torch module/state dict or a jax pytree. Only specs are taken from targets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge import io as wio
from weightbridge.errors import SpecError
from weightbridge.match import Matcher as AutoMatcher
from weightbridge.plan import Plan
from weightbridge.planner import Matcher, Rename, make_plan
from weightbridge.spec import CheckpointSpec, TensorSpec, load_spec_file
from weightbridge.stream import DEFAULT_MAX_SHARD_SIZE, ConversionReport
from weightbridge.stream import convert as _stream_convert
from weightbridge.stream import verify as _stream_verify

PLAN_FILE = ".weightbridge-plan.json"


def spec_of(obj: Any) -> CheckpointSpec:
    """Specs of anything weightbridge accepts as a source or a target (never reads tensor data)."""
    if isinstance(obj, CheckpointSpec):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if path.endswith(".json") and not path.endswith(".index.json") and os.path.isfile(path):
            return load_spec_file(path)
        with wio.open_reader(path) as r:
            spec: CheckpointSpec = r.specs()
            return spec
    from weightbridge.frameworks import framework_of

    fw = framework_of(obj)
    if fw == "torch":
        from weightbridge.frameworks.torch import spec_from_torch

        return spec_from_torch(obj)
    if fw == "jax":
        from weightbridge.frameworks.jax import spec_from_pytree

        return spec_from_pytree(obj)
    if isinstance(obj, Mapping):
        return CheckpointSpec.of(_leaf_spec(k, v) for k, v in _flatten(obj).items())
    raise SpecError(
        f"cannot take specs from a {type(obj).__name__}; pass a checkpoint path, a spec JSON "
        "file, a dict of arrays, a torch module/state dict or a jax pytree"
    )


def _flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, name, sep))
        else:
            out[name] = v
    return out


def _leaf_spec(name: str, leaf: Any) -> TensorSpec:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return TensorSpec(name, tuple(leaf.shape), dtypes.from_numpy(np.dtype(leaf.dtype)))
    raise SpecError(f"leaf {name!r} is a {type(leaf).__name__}, not an array or shape/dtype struct")


def inspect(path: str | os.PathLike[str]) -> CheckpointSpec:
    """Specs of a checkpoint, from its headers alone.

    >>> import tempfile, numpy as np
    >>> from weightbridge.io import write_checkpoint
    >>> p = tempfile.mkdtemp() + "/m.safetensors"
    >>> write_checkpoint(p, {"w": np.zeros((2, 3), np.float32)})
    >>> inspect(p)["w"]
    TensorSpec(name='w', shape=(2, 3), dtype='F32')
    """
    return spec_of(path)


def plan(
    source: Any,
    target: Any = None,
    *,
    renames: Sequence[Rename | str] = (),
    from_framework: str | None = None,
    to_framework: str | None = None,
    dtype: str | None = None,
    hints: Sequence[tuple[str, str]] = (),
    matcher: Matcher | None = None,
    log: list[str] | None = None,
) -> Plan:
    """Plan a conversion from specs alone (no tensor data is read). See `planner.make_plan`.

    With a target, tensors the renames do not pair by name are paired by the automatic matcher
    (`weightbridge.match`), which `hints` (target substring, source substring) steer.
    """
    return _make(
        spec_of(source), target, renames, from_framework, to_framework, dtype, hints, matcher, log
    )


def _make(
    source: CheckpointSpec,
    target: Any,
    renames: Sequence[Rename | str],
    from_framework: str | None,
    to_framework: str | None,
    dtype: str | None,
    hints: Sequence[tuple[str, str]],
    matcher: Matcher | None = None,
    log: list[str] | None = None,
) -> Plan:
    if matcher is None and target is not None:
        matcher = AutoMatcher(
            from_framework, to_framework, tuple(hints), log if log is not None else []
        )
    return make_plan(
        source,
        None if target is None else spec_of(target),
        renames=_rules(renames),
        from_framework=from_framework,
        to_framework=to_framework,
        dtype=dtype,
        matcher=matcher,
    )


def _rules(renames: Sequence[Rename | str]) -> list[Rename]:
    return [r if isinstance(r, Rename) else Rename.parse(r) for r in renames]


def convert(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    target: Any = None,
    plan: Plan | str | os.PathLike[str] | None = None,
    renames: Sequence[Rename | str] = (),
    from_framework: str | None = None,
    to_framework: str | None = None,
    dtype: str | None = None,
    hints: Sequence[tuple[str, str]] = (),
    format: str = "safetensors",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionReport:
    """Plan (unless a plan is given) and stream `source` into the directory `dest`.

    The plan is saved in `dest` as ``.weightbridge-plan.json`` so `verify` can recheck it.
    """
    source = os.fspath(source)
    with wio.open_reader(source) as reader:
        if plan is None:
            the_plan = _make(
                reader.specs(), target, renames, from_framework, to_framework, dtype, hints
            )
        else:
            the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
            if target is not None:
                the_plan.validate(reader.specs(), target=spec_of(target))
        report = _stream_convert(
            the_plan,
            reader,
            dest,
            format=format,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
        )
    the_plan.save(os.path.join(os.fspath(dest), PLAN_FILE))
    return report


def verify(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    plan: Plan | str | os.PathLike[str] | None = None,
) -> int:
    """Recompute every output tensor from the source and compare; returns how many were checked."""
    dest = os.fspath(dest)
    if plan is None:
        plan = os.path.join(dest, PLAN_FILE)
    the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    return _stream_verify(the_plan, source, dest)


def save_spec(obj: Any, path: str | os.PathLike[str]) -> CheckpointSpec:
    """Write the target spec file of anything `spec_of` accepts."""
    spec = spec_of(obj)
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        json.dump(spec.to_json(), f, indent=1)
        f.write("\n")
    return spec
